"""Fetching the CIFAR archives into the data folder: verified, atomic, resumable after a kill.

:func:`ensure_cifar` makes ``ROOT/<folder>`` (``cifar-10-batches-py`` or ``cifar-100-python``)
hold the extracted official python archive:

1. An archive already in ``ROOT`` whose md5 matches is extracted; nothing is downloaded.
2. Otherwise, when downloading is allowed, the archive is streamed from
   ``$MASKPACK_CIFAR_URL`` (default :data:`CIFAR_URL`, the official site) into a temporary
   ``ROOT/<archive>.<random>.part``, its length and md5 are checked, and only then is it renamed
   to ``ROOT/<archive>``. A truncated or corrupt download is deleted and never takes the
   archive's name.
3. The archive is extracted into a temporary folder in ``ROOT`` and renamed into place, so a
   half-extracted folder never looks finished.

Downloading is allowed when ``download`` is True, or None (auto) and ``MASKPACK_OFFLINE`` is
unset; ``download=False`` never touches the network. Concurrent processes (torchrun ranks)
serialise on a lock file ``ROOT/.<archive>.lock``: one downloads, the others wait and find the
archive there. Temporary files left by a killed run are removed by the next one that holds
the lock.

Example:
    >>> ensure_cifar("cifar100", "~/.cache/maskpack/data", download=None)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"  # the official site (torchvision's CIFAR10.url)
URL_ENV = "MASKPACK_CIFAR_URL"  # overrides CIFAR_URL: a mirror, or a local server in tests
OFFLINE_ENV = "MASKPACK_OFFLINE"  # set (to anything but 0/false/no/off) to never download
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "maskpack", "data")
_CHUNK = 1 << 20
_TIMEOUT_S = 60


@dataclass(frozen=True)
class Archive:
    """One official CIFAR archive.

    Attributes:
        filename: the archive's name on the server and in the data folder.
        md5: its official md5 (torchvision's ``tgz_md5``).
        folder: the folder it extracts to.
        size: its size in bytes (shown before the server answers; the check uses the md5).
    """

    filename: str
    md5: str
    folder: str
    size: int


CIFAR = {
    "cifar10": Archive("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
                       170_498_071),
    "cifar100": Archive("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
                        169_001_437),
}


def data_root(data_dir: str | os.PathLike | None) -> Path:
    """The data folder: ``data_dir`` or ``~/.cache/maskpack/data``, with ``~`` expanded."""
    return Path(os.path.expanduser(os.fspath(data_dir) if data_dir else DEFAULT_DATA_DIR))


def archive_url(archive: Archive) -> str:
    """Where ``archive`` is fetched from: ``$MASKPACK_CIFAR_URL`` (or :data:`CIFAR_URL`) + its name."""
    base = os.environ.get(URL_ENV) or CIFAR_URL
    return base.rstrip("/") + "/" + archive.filename


def download_policy(download: bool | None) -> tuple[bool, str]:
    """Resolve the tri-state ``download`` option.

    Args:
        download: True (download when missing, even offline), False (never), None (auto: download
            unless ``MASKPACK_OFFLINE`` is set).

    Returns:
        ``(allowed, why_not)``: ``why_not`` names what turned downloading off ("" when allowed).
    """
    if download is not None:
        return bool(download), "" if download else "--no-download"
    value = os.environ.get(OFFLINE_ENV, "")
    if value.strip().lower() in ("", "0", "false", "no", "off"):
        return True, ""
    return False, f"{OFFLINE_ENV}={value}"


def file_md5(path: Path) -> str:
    """The md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def ensure_cifar(name: str, data_dir: str | os.PathLike | None, *, download: bool | None = None,
                 quiet: bool = False, present: Callable[[], bool] | None = None) -> Path:
    """Make ``ROOT/<folder>`` hold the extracted archive of ``name``, fetching it if allowed.

    Args:
        name: ``cifar10`` or ``cifar100``.
        data_dir: the data folder (default ``~/.cache/maskpack/data``).
        download: True / False / None (auto), as for :func:`download_policy`.
        quiet: no progress bar or messages (they go to stderr).
        present: returns True when the extracted folder is already complete; asked again after
            waiting for another process's lock, so the work is not repeated.

    Returns:
        The extracted folder.

    Raises:
        DataError: downloading is off and no archive is there (the message names the folder, the
            archive and its URL), the download failed or did not match its md5, or the archive does
            not extract.
    """
    archive = CIFAR[name]
    root = data_root(data_dir)
    allowed, why_not = download_policy(download)
    if not allowed and not (root / archive.filename).exists():
        raise _offline_error(name, root, archive, why_not)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data folder {root} for {name}: {exc}; choose another "
                        "--data-dir") from exc
    say = _messenger(quiet)
    with _locked(root, archive.filename, say) as exclusive:
        if present is not None and present():
            return root / archive.folder  # another process finished while we waited
        if exclusive:
            _remove_stale(root, archive)
        path = root / archive.filename
        if path.exists() and (found := file_md5(path)) != archive.md5:
            if not allowed:
                raise DataError(f"{path} has md5 {found}, not the official {archive.md5}: delete it and "
                                f"put the archive from {archive_url(archive)} there (downloading is off: "
                                f"{why_not})")
            say(f"{path} is corrupt (md5 {found}): downloading it again")
            path.unlink()
        if not path.exists():
            fetch(archive_url(archive), path, archive.md5, quiet=quiet, expected_size=archive.size)
        say(f"extracting {archive.filename} into {root / archive.folder}")
        extract(path, root, archive.folder)
    return root / archive.folder


def _offline_error(name: str, root: Path, archive: Archive, why_not: str) -> DataError:
    state = "is incomplete" if (root / archive.folder).exists() else "is not"
    return DataError(f"{name} {state} in {root} and downloading is off ({why_not}): put "
                     f"{archive.filename} from {archive_url(archive)} (or its extracted folder "
                     f"{archive.folder}/) in {root}, or run with --download")


def fetch(url: str, dest: Path, md5: str, *, quiet: bool = False, expected_size: int | None = None) -> Path:
    """Download ``url`` to ``dest`` through a temporary file beside it; rename only once verified.

    Args:
        url: http(s) or file URL.
        dest: the final path; it appears only when the whole file arrived and its md5 matches.
        md5: the expected md5 (hex).
        quiet: no progress bar (it goes to stderr).
        expected_size: bytes to show in the progress bar when the server sends no length.

    Returns:
        ``dest``.

    Raises:
        DataError: network failure, a response shorter than its Content-Length, or a wrong md5.
    """
    try:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f"{dest.name}.", suffix=".part")
    except OSError as exc:
        raise DataError(f"cannot write into {dest.parent}: {exc}; choose another --data-dir") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        got, total, digest = _stream(url, tmp, label=f"downloading {dest.name}", quiet=quiet,
                                     expected_size=expected_size)
        if total is not None and got != total:
            raise DataError(f"download of {url} stopped after {got:,} of {total:,} bytes: nothing was "
                            f"kept in {dest.parent}; run again to retry")
        if digest != md5:
            raise DataError(f"download of {url} has md5 {digest}, not the official {md5}: nothing was kept "
                            f"in {dest.parent}; run again, or download it yourself and put it there as "
                            f"{dest.name}")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, dest)
    except (OSError, ValueError, http.client.HTTPException) as exc:  # ValueError: a malformed URL
        reason = exc.reason if type(exc) is urllib.error.URLError else exc  # HTTPError: code + reason
        raise DataError(f"could not download {url} into {dest.parent}: {reason}; check the network, or "
                        f"download it elsewhere and put it there as {dest.name}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _stream(url: str, tmp: Path, *, label: str, quiet: bool,
            expected_size: int | None) -> tuple[int, int | None, str]:
    """Copy the response body to ``tmp``; return (bytes received, Content-Length or None, md5)."""
    h, got = hashlib.md5(), 0
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp, open(tmp, "wb") as f:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with _progress_bar(quiet, label, total or expected_size) as advance:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                h.update(chunk)
                got += len(chunk)
                advance(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    return got, total, h.hexdigest()


def extract(path: Path, root: Path, folder: str) -> None:
    """Extract the archive ``path`` (which must hold only ``folder/...`` files) to ``root/folder``.

    Extraction goes into a temporary folder in ``root``, renamed into place at the end; an old
    ``root/folder`` (incomplete or corrupt) is replaced.

    Raises:
        DataError: the archive is not a readable tar.gz or holds anything outside ``folder/``.
    """
    tmpdir = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder}.", suffix=".extract"))
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = _checked_members(tar, folder, path)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmpdir, members=members, **kwargs)
        if not (tmpdir / folder).is_dir():
            raise DataError(f"{path} holds no '{folder}/' folder: delete it and download it again")
        dest = root / folder
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmpdir / folder, dest)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a readable tar.gz archive ({exc}): delete it and run again") from exc
    except OSError as exc:
        raise DataError(f"could not extract {path} into {root}: {exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _checked_members(tar: tarfile.TarFile, folder: str, path: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if not (m.isfile() or m.isdir()) or not parts or parts[0] != folder or ".." in parts \
                or os.path.isabs(m.name):
            raise DataError(f"{path} holds {m.name!r}, not a plain file under '{folder}/': refusing to "
                            "extract it; delete the archive and download the official one")
    return members


def _remove_stale(root: Path, archive: Archive) -> None:
    """Delete partial downloads and extractions left by killed runs (the caller holds the lock)."""
    for p in root.glob(f"{archive.filename}.*.part"):
        p.unlink(missing_ok=True)
    for p in root.glob(f".{archive.folder}.*.extract"):
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _locked(root: Path, filename: str, say: Callable[[str], None]) -> Iterator[bool]:
    """Hold ``root/.<filename>.lock`` exclusively; yields False where file locks do not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: unique temporary names still keep the cache whole
        yield False
        return
    try:
        fh = open(root / f".{filename}.lock", "a+b")  # closed by the `with` below
    except OSError as exc:
        raise DataError(f"cannot write into the data folder {root}: {exc}; choose another --data-dir") \
            from exc
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process to fetch {filename} into {root}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _messenger(quiet: bool) -> Callable[[str], None]:
    if quiet:
        return lambda _msg: None
    from rich.console import Console

    console = Console(stderr=True)
    return lambda msg: console.print(msg, highlight=False, markup=False, soft_wrap=True)


@contextlib.contextmanager
def _progress_bar(quiet: bool, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich download bar on stderr (bytes, speed, time left); yields ``advance(n_bytes)``."""
    if quiet:
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True)) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n: prog.update(task, advance=n)
