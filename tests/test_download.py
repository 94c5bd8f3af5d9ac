"""Fetching CIFAR on first use: the real download code against a local HTTP server.

The server (127.0.0.1, a free port) serves a tiny archive in the official format; its md5 and
the extracted files' md5s (torchvision checks them) are patched in. Every request is counted,
so a run that should use the cache proves it made none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner
from test_data import _write_cifar10

from maskpack import data, download
from maskpack.cli import main
from maskpack.errors import DataError

OFFICIAL = "https://www.cs.toronto.edu/~kriz/"
FAST = ["--image-size", "32", "--batch-size", "2", "--epochs", "1", "--max-steps", "1", "--knn", "never",
        "--threads", "1", "--set", "eval_every=0", "--set", "bn_reestimate_batches=1"]


def _tar(stage, folder: str, extra: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(stage / folder, arcname=folder)
        for name, payload in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


class _Server:
    """Serves ``files`` ({name: bytes}); ``truncate`` sends half a body under the full length."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.truncate = False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                outer.requests.append(self.path)
                body = outer.files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if outer.truncate else body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture
def cifar10_archive(tmp_path, monkeypatch, server):
    """A tiny cifar-10-python.tar.gz on the server, its md5 patched in; downloading allowed."""
    from torchvision.datasets import CIFAR10

    stage = tmp_path / "stage"
    md5 = _write_cifar10(stage)
    train_list = [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": md5["batches.meta"]})
    body = _tar(stage, "cifar-10-batches-py")
    server.files["cifar-10-python.tar.gz"] = body
    official = download.CIFAR["cifar10"]
    monkeypatch.setitem(download.CIFAR, "cifar10", dataclasses.replace(
        official, md5=hashlib.md5(body).hexdigest(), size=len(body)))
    monkeypatch.setenv("MASKPACK_CIFAR_URL", server.url)
    monkeypatch.delenv("MASKPACK_OFFLINE")
    return body


def _files(root) -> list[str]:
    """What a run left in the data folder (the lock file aside)."""
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_official_archives_match_torchvision():
    from torchvision.datasets import CIFAR10, CIFAR100

    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        a = download.CIFAR[name]
        assert download.CIFAR_URL + a.filename == cls.url
        assert (a.filename, a.md5, a.folder) == (cls.filename, cls.tgz_md5, cls.base_folder)


def test_first_run_downloads_and_trains_then_the_cache_is_used(tmp_path, server, cifar10_archive):
    root = tmp_path / "data"
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--dataset", "cifar10", "--data-dir", str(root), *FAST,
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert server.requests == ["/mirror/cifar-10-python.tar.gz"]
    assert "downloading cifar-10-python.tar.gz" in res.stderr
    assert f"extracting cifar-10-python.tar.gz into {root / 'cifar-10-batches-py'}" in res.stderr
    assert _files(root) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert (root / "cifar-10-python.tar.gz").read_bytes() == cifar10_archive
    assert json.loads((out / "config.json").read_text())["download"] is None
    # second run (eval of the task just trained): the cache answers, the server sees nothing
    res = CliRunner().invoke(main, ["eval", str(out / "task.mask"), "--data-dir", str(root), "--no-probe",
                                    "--no-baseline", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["task"]["accuracy"] >= 0.0
    assert len(server.requests) == 1 and "downloading" not in res.stderr


def test_quiet_prints_nothing(tmp_path, server, cifar10_archive, capfd):
    d = data.load_dataset("cifar10", data_dir=str(tmp_path / "d"), quiet=True)
    assert (len(d.train), len(d.test), d.classes[1]) == (10, 6, "automobile")
    assert len(server.requests) == 1
    assert capfd.readouterr().err == ""


def test_truncated_download_is_refused_and_leaves_nothing(tmp_path, server, cifar10_archive):
    root = tmp_path / "data"
    server.truncate = True
    n = len(cifar10_archive)
    with pytest.raises(DataError, match=rf"stopped after {n // 2:,} of {n:,} bytes: nothing was kept in "):
        data.load_dataset("cifar10", data_dir=str(root), quiet=True)
    assert _files(root) == []
    server.truncate = False
    assert data.load_dataset("cifar10", data_dir=str(root), quiet=True).num_classes == 10
    assert len(server.requests) == 2


def test_wrong_md5_is_refused_and_leaves_nothing(tmp_path, server, cifar10_archive, monkeypatch):
    root = tmp_path / "data"
    server.files["cifar-10-python.tar.gz"] = cifar10_archive[:-1] + bytes([cifar10_archive[-1] ^ 1])
    want = download.CIFAR["cifar10"].md5
    with pytest.raises(DataError, match=rf"has md5 [0-9a-f]{{32}}, not the official {want}: nothing was"):
        data.load_dataset("cifar10", data_dir=str(root), quiet=True)
    assert _files(root) == []


def test_leftovers_of_a_killed_run_are_removed(tmp_path, server, cifar10_archive):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz.4242.part").write_bytes(cifar10_archive[:100])  # killed download
    (root / ".cifar-10-batches-py.abc.extract" / "cifar-10-batches-py").mkdir(parents=True)  # killed extract
    (root / "cifar-10-batches-py").mkdir()  # an incomplete folder
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half")
    assert data.load_dataset("cifar10", data_dir=str(root), quiet=True).num_classes == 10
    assert [p.name for p in root.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []
    assert _files(root) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]


def test_a_process_waiting_for_the_lock_uses_what_the_holder_fetched(tmp_path, server, cifar10_archive,
                                                                    monkeypatch):
    import fcntl

    root = tmp_path / "data"
    root.mkdir()
    waiting = threading.Event()
    monkeypatch.setattr(download, "_messenger", lambda quiet: lambda msg: waiting.set() if "waiting" in msg
                        else None)
    result = {}
    with open(root / ".cifar-10-python.tar.gz.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process is fetching
        t = threading.Thread(target=lambda: result.update(d=data.load_dataset("cifar10", data_dir=str(root))))
        t.start()
        assert waiting.wait(30)
        (root / "cifar-10-python.tar.gz").write_bytes(cifar10_archive)  # ... and finishes
        download.extract(root / "cifar-10-python.tar.gz", root, "cifar-10-batches-py")
        fcntl.flock(lock, fcntl.LOCK_UN)
    t.join(30)
    assert result["d"].num_classes == 10 and server.requests == []


def test_corrupt_archive_in_the_cache_is_fetched_again(tmp_path, server, cifar10_archive):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"not an archive")
    assert data.load_dataset("cifar10", data_dir=str(root), quiet=True).num_classes == 10
    assert (root / "cifar-10-python.tar.gz").read_bytes() == cifar10_archive


def test_archive_put_there_by_hand_is_used_offline(tmp_path, server, cifar10_archive):
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(cifar10_archive)
    d = data.load_dataset("cifar10", data_dir=str(root), download=False, quiet=True)
    assert d.num_classes == 10 and server.requests == []


def test_no_download_with_an_empty_cache_is_the_offline_error(tmp_path, server, cifar10_archive):
    root = tmp_path / "empty"
    res = CliRunner().invoke(main, ["train", "--dataset", "cifar10", "--data-dir", str(root), "--no-download",
                                    *FAST, "--out", str(tmp_path / "run")])
    assert res.exit_code == 1
    assert res.output.splitlines()[-1] == (
        f"Error: cifar10 is not in {root} and downloading is off (--no-download): put cifar-10-python.tar.gz "
        f"from {server.url}cifar-10-python.tar.gz (or its extracted folder cifar-10-batches-py/) in {root}, "
        "or run with --download")
    assert server.requests == [] and not root.exists()


@pytest.mark.parametrize("cmd", [["bench", "--out", "{tmp}/b"], ["cascade", "--out", "{tmp}/c"],
                                 ["eval", "--no-probe"]])
def test_maskpack_offline_is_the_offline_error(tmp_path, monkeypatch, cmd):
    monkeypatch.setenv("MASKPACK_OFFLINE", "1")
    monkeypatch.delenv("MASKPACK_CIFAR_URL")
    root = tmp_path / "empty"
    args = [a.format(tmp=tmp_path) for a in cmd]
    res = CliRunner().invoke(main, [*args, "--dataset", "cifar100", "--data-dir", str(root)])
    assert res.exit_code == 1
    assert res.output.splitlines()[-1] == (
        f"Error: cifar100 is not in {root} and downloading is off (MASKPACK_OFFLINE=1): put "
        f"cifar-100-python.tar.gz from {OFFICIAL}cifar-100-python.tar.gz (or its extracted folder "
        f"cifar-100-python/) in {root}, or run with --download")


def test_download_flag_overrides_maskpack_offline(tmp_path, server, cifar10_archive, monkeypatch):
    monkeypatch.setenv("MASKPACK_OFFLINE", "1")
    with pytest.raises(DataError, match=r"downloading is off \(MASKPACK_OFFLINE=1\)"):
        data.load_dataset("cifar10", data_dir=str(tmp_path / "a"))
    d = data.load_dataset("cifar10", data_dir=str(tmp_path / "b"), download=True, quiet=True)
    assert d.num_classes == 10
    assert len(server.requests) == 1


@pytest.mark.parametrize("value,allowed", [("", True), ("0", True), ("false", True), ("1", False),
                                           ("yes", False)])
def test_download_policy(monkeypatch, value, allowed):
    monkeypatch.setenv("MASKPACK_OFFLINE", value)
    assert download.download_policy(None)[0] is allowed
    assert download.download_policy(True) == (True, "")
    assert download.download_policy(False) == (False, "--no-download")


def test_server_failure_is_one_clear_error(tmp_path, server, cifar10_archive):
    del server.files["cifar-10-python.tar.gz"]
    msg = r"could not download \S+/cifar-10-python.tar.gz into .*: HTTP Error 404: Not Found; check"
    with pytest.raises(DataError, match=msg):
        data.load_dataset("cifar10", data_dir=str(tmp_path / "d"), quiet=True)
    assert _files(tmp_path / "d") == []


def test_archive_with_paths_outside_its_folder_is_refused(tmp_path, server, cifar10_archive, monkeypatch):
    stage = tmp_path / "stage"
    evil = _tar(stage, "cifar-10-batches-py", extra={"../evil.txt": b"x"})
    server.files["cifar-10-python.tar.gz"] = evil
    monkeypatch.setitem(download.CIFAR, "cifar10", dataclasses.replace(
        download.CIFAR["cifar10"], md5=hashlib.md5(evil).hexdigest()))
    with pytest.raises(DataError, match=r"holds '../evil.txt', not a plain file under 'cifar-10-batches-py/"):
        data.load_dataset("cifar10", data_dir=str(tmp_path / "d"), quiet=True)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "d" / "cifar-10-batches-py").exists()
