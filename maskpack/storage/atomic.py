"""The one atomic file writer: every output file appears whole or not at all.

``atomic_write(path, write)`` creates a temp file in the destination folder, lets ``write`` fill
it, fsyncs it, renames it over ``path`` and fsyncs the folder. Readers see the old file or the
new one, never a torn one. Properties:

* Mode: the temp file is created with ``os.open(..., 0o666)``, so the kernel applies the umask
  (and any default ACL) exactly as ``open(path, "w")`` would: ``0o666 & ~umask`` (0644 under the
  usual umask 022). Nothing reads or changes the process umask.
* Names: ``.<name>.maskpack-<pid>-<random>.tmp`` beside the destination, so a leftover is
  recognisable and says which process made it.
* Leftovers: a write that is killed (SIGKILL, power loss) can leave its temp file. Every
  ``atomic_write`` first removes stale temp files in its folder: those whose owning pid is no
  longer running and that have not been touched for :data:`STALE_DEAD_PID_S` seconds, and any
  untouched for :data:`STALE_ANY_S` seconds (a reused pid; names without a pid from older
  writers). ``maskpack verify`` lists leftovers next to the file it checks.

Example:
    >>> from safetensors.torch import save_file                      # doctest: +SKIP
    >>> atomic_write("model.safetensors", lambda tmp: save_file(state, tmp))  # doctest: +SKIP
    >>> write_atomic("notes.json", b"{}")                           # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

TAG = ".maskpack-"
STALE_DEAD_PID_S = 60  # a dead owner's temp file untouched this long is removed
STALE_ANY_S = 3600  # any temp file untouched this long is removed (pid reused, or no pid)
# ".<name>.maskpack-<pid>-<random>.tmp", and the older ".maskpack-<random>.tmp" (mkstemp)
_TEMP = re.compile(r"^\.(?:.*\.)?maskpack-(?:(\d{1,10})-)?[A-Za-z0-9_]{1,32}\.tmp$")


@dataclass(frozen=True)
class Leftover:
    """A temp file left by an interrupted write.

    Attributes:
        path: its path. size: bytes. age_s: seconds since it was last modified.
        pid: the writer's process id (None for names without one).
        owner_alive: whether a process with that pid is running on this machine.
        stale: whether the next write to the folder removes it.
    """

    path: str
    size: int
    age_s: float
    pid: int | None
    owner_alive: bool
    stale: bool


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: assume alive, age decides
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists but belongs to another user
        return True
    return True


def leftover_temp_files(folder: str | os.PathLike) -> list[Leftover]:
    """Temp files of interrupted writes in ``folder`` (this writer's naming), oldest first.

    Args:
        folder: the directory to look in.

    Returns:
        One :class:`Leftover` per temp file; an unreadable folder gives ``[]``.
    """
    out = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for e in entries:
        m = _TEMP.match(e.name)
        if not m:
            continue
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        pid = int(m.group(1)) if m.group(1) else None
        alive = pid is not None and (pid == os.getpid() or _pid_alive(pid))
        age = max(0.0, now - st.st_mtime)
        stale = age > STALE_ANY_S or (not alive and pid is not None and age > STALE_DEAD_PID_S)
        out.append(Leftover(e.path, st.st_size, age, pid, alive, stale))
    return sorted(out, key=lambda x: -x.age_s)


def clean_stale_temp_files(folder: str | os.PathLike) -> list[str]:
    """Remove the stale leftovers in ``folder`` (see the module doc); never raises.

    Args:
        folder: the directory to clean.

    Returns:
        The paths removed.
    """
    removed = []
    for lo in leftover_temp_files(folder):
        if lo.stale:
            try:
                os.unlink(lo.path)
                removed.append(lo.path)
            except OSError:
                pass  # another writer removed it, or no permission: not this write's concern
    return removed


def _temp_path(folder: str, name: str) -> tuple[str, int]:
    """Create a new, empty temp file with mode 0o666 & ~umask; returns (path, fd)."""
    short = os.fsdecode(os.fsencode(name)[:180])
    for _ in range(100):
        # the name is cut so that the temp name stays within the usual 255-byte limit
        tmp = os.path.join(folder, f".{short}{TAG}{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                                0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temp file in {folder}")


def _fsync_folder(folder: str) -> None:
    try:  # make the rename itself durable where the platform allows it
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically through ``write(tmp_path)``.

    ``write`` receives the path of an empty temp file in the destination folder and fills it
    (open it by name, or pass it to ``torch.save`` / ``safetensors.torch.save_file`` ...). Then
    the temp file is fsynced and renamed over ``path`` and the folder is fsynced. On any error
    (including KeyboardInterrupt) the temp file is removed and ``path`` is left as it was. Stale
    temp files of earlier interrupted writes in the folder are removed first.

    Args:
        path: the destination file.
        write: a callable that writes the complete content to the path it is given.

    Example:
        >>> atomic_write("out.json", lambda tmp: open(tmp, "w").write("{}"))  # doctest: +SKIP
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    clean_stale_temp_files(folder)
    tmp, fd = _temp_path(folder, os.path.basename(path))
    try:
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(folder)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write the bytes ``data`` to ``path`` atomically (see :func:`atomic_write`).

    Args:
        path: the destination file.
        data: its complete content.
    """
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, fill)
