"""Dataset downloads against a real local HTTP server: Zenodo API, Range resume, cut connections."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import socket
import sys
import threading
import time
import types
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from histodiffusion.data import fetch as F
from histodiffusion.errors import UserError
from tests.helpers import noise, write_image

NCT_ID, PCAM_ID = "1214456", "2546921"


def _png(seed: int, size: int = 48) -> bytes:
    """A noisy (hard to compress) RGB PNG."""
    return write_image(io.BytesIO(), noise(size, seed)).getvalue()


def _zip(top: str, labels: tuple[str, ...], seed: int) -> bytes:
    """A zip shaped like the NCT archives: ``top/<LABEL>/<file>.png`` plus folder entries."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{top}/", b"")
        for i, label in enumerate(labels):
            zf.writestr(f"{top}/{label}/", b"")
            zf.writestr(f"{top}/{label}/{label.lower()}{i}.png", _png(seed + i))
    return buf.getvalue()


def _gz_npz(**arrays: np.ndarray) -> bytes:
    """Gzipped npz bytes (read back by the fake h5py below)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return gzip.compress(buf.getvalue())


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


NCT_FILES = {
    "NCT-CRC-HE-100K.zip": _zip("NCT-CRC-HE-100K", ("ADI", "TUM", "STR"), 0),
    "CRC-VAL-HE-7K.zip": _zip("CRC-VAL-HE-7K", ("ADI", "TUM"), 10),
}


def _pcam_files() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    out = {}
    for split, n in (("train", 4), ("valid", 3), ("test", 2)):
        x = rng.integers(0, 255, (n, 96, 96, 3), dtype=np.uint8)
        y = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
        out[f"camelyonpatch_level_2_split_{split}_x.h5.gz"] = _gz_npz(x=x)
        out[f"camelyonpatch_level_2_split_{split}_y.h5.gz"] = _gz_npz(y=y)
    return out


class State:
    """What the fake server serves and what it saw."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.records: dict[str, list[str]] = {}
        self.cut_once: set[str] = set()
        self.bad_md5: set[str] = set()
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []


def _handler(state: State, base: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state.requests.append((self.path, self.headers.get("Range")))
            m = re.fullmatch(r"/api/records/(\w+)", self.path)
            if m and m.group(1) in state.records:
                return self._record(m.group(1))
            if self.path in state.blobs:
                return self._blob(state.blobs[self.path])
            self.send_error(404)

        def _record(self, rid: str) -> None:
            files = []
            for key in state.records[rid]:
                data = state.blobs[f"/files/{rid}/{key}"]
                md5 = "0" * 32 if key in state.bad_md5 else _md5(data)
                link = f"{base[0]}/files/{rid}/{key}"
                files.append(
                    {
                        "key": key,
                        "size": len(data),
                        "checksum": f"md5:{md5}",
                        "links": {"self": link},
                    }
                )
            body = json.dumps({"id": rid, "files": files}).encode()
            self._send(200, body, {"Content-Type": "application/json"})

        def _blob(self, data: bytes) -> None:
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if m and not state.ignore_range:
                start = int(m.group(1))
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                rng = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._send(206, data[start:], {"Content-Range": rng})
            if self.path in state.cut_once:
                state.cut_once.discard(self.path)
                self._send(200, data, {}, cut=len(data) // 2)
                return
            self._send(200, data, {})

        def _send(self, code: int, body: bytes, headers: dict, cut: int | None = None) -> None:
            self.send_response(code)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body if cut is None else body[:cut])
            self.wfile.flush()
            if cut is not None:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

    return Handler


@pytest.fixture(scope="module")
def _server():
    state, base = State(), [""]
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state, base))
    srv.daemon_threads = True
    base[0] = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield state, base[0]
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server(_server):
    """(state, base URL) with the fake NCT and PCam records, fresh per test."""
    state, base = _server
    state.__init__()
    for rid, files in ((NCT_ID, NCT_FILES), (PCAM_ID, _pcam_files())):
        state.records[rid] = list(files)
        state.blobs.update({f"/files/{rid}/{k}": v for k, v in files.items()})
    return state, base


def _file_requests(state: State) -> list[tuple[str, str | None]]:
    return [r for r in state.requests if r[0].startswith("/files/")]


@pytest.fixture
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ----------------------------------------------------------------------------- tests


def test_full_fetch_builds_imagefolder_and_rerun_is_noop(server, tmp_path):
    state, base = server
    out = F.fetch("nct_crc_he_100k", tmp_path, zenodo_api=f"{base}/api", progress=False)
    assert out == tmp_path / "nct_crc_he_100k"
    assert sorted(p.name for p in (out / "train").iterdir()) == ["ADI", "STR", "TUM"]
    assert sorted(p.name for p in (out / "test").iterdir()) == ["ADI", "TUM"]
    with Image.open(out / "train" / "ADI" / "adi0.png") as im:
        assert im.size == (48, 48)
    marker = json.loads((out / "FETCHED").read_text())
    assert marker["files"]["CRC-VAL-HE-7K.zip"]["md5"] == _md5(NCT_FILES["CRC-VAL-HE-7K.zip"])
    assert all(v["verified"] for v in marker["files"].values())
    assert not list(out.glob(".*"))  # no temp folders left
    seen = len(state.requests)
    F.fetch("nct_crc_he_100k", tmp_path, zenodo_api=f"{base}/api", progress=False)
    assert len(state.requests) == seen


def test_resume_after_cut_connection(server, tmp_path):
    state, base = server
    path = f"/files/{NCT_ID}/NCT-CRC-HE-100K.zip"
    data = state.blobs[path]
    state.cut_once.add(path)
    dest = F.download(base + path, tmp_path / "a.zip", _md5(data), len(data), progress=False)
    assert F.md5sum(dest) == _md5(data)
    assert _file_requests(state) == [(path, None), (path, f"bytes={len(data) // 2}-")]
    assert not (tmp_path / "a.zip.part").exists()


def test_wrong_checksum_is_rejected_and_cleaned(server, tmp_path):
    state, base = server
    state.bad_md5.add("CRC-VAL-HE-7K.zip")
    with pytest.raises(UserError, match=r"(?s)md5.*CRC-VAL-HE-7K\.zip|CRC-VAL-HE-7K\.zip.*md5"):
        F.fetch("nct_crc_he_100k", tmp_path, zenodo_api=f"{base}/api", progress=False)
    downloads = tmp_path / "nct_crc_he_100k" / "downloads"
    assert not (downloads / "CRC-VAL-HE-7K.zip").exists()
    assert not (downloads / "CRC-VAL-HE-7K.zip.part").exists()
    assert not (tmp_path / "nct_crc_he_100k" / "FETCHED").exists()


def test_offline_fails_fast_with_manual_instructions(tmp_path, closed_port, monkeypatch):
    monkeypatch.setenv(F.ZENODO_API_ENV, f"http://127.0.0.1:{closed_port}/api")
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        F.fetch("nct_crc_he_100k", tmp_path, progress=False)
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert str(tmp_path / "nct_crc_he_100k" / "downloads") in msg
    assert "NCT-CRC-HE-100K.zip" in msg and "CRC-VAL-HE-7K.zip" in msg
    assert str(tmp_path / "nct_crc_he_100k" / "train") in msg
    assert "zenodo.org/records/1214456" in msg


def test_offline_uses_files_placed_by_hand(tmp_path, closed_port):
    downloads = tmp_path / "nct_crc_he_100k" / "downloads"
    downloads.mkdir(parents=True)
    for name, data in NCT_FILES.items():
        (downloads / name).write_bytes(data)
    api = f"http://127.0.0.1:{closed_port}/api"
    out = F.fetch("nct_crc_he_100k", tmp_path, zenodo_api=api, progress=False)
    assert (out / "train" / "TUM" / "tum1.png").is_file()
    assert (out / "test" / "ADI" / "adi0.png").is_file()
    marker = json.loads((out / "FETCHED").read_text())
    assert not any(v["verified"] for v in marker["files"].values())


def test_existing_part_file_is_resumed(server, tmp_path):
    state, base = server
    path = f"/files/{NCT_ID}/CRC-VAL-HE-7K.zip"
    data, half = state.blobs[path], len(state.blobs[path]) // 2
    (tmp_path / "b.zip.part").write_bytes(data[:half])
    dest = F.download(base + path, tmp_path / "b.zip", _md5(data), progress=False)
    assert dest.read_bytes() == data
    assert _file_requests(state) == [(path, f"bytes={half}-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    state, base = server
    state.ignore_range = True
    path = f"/files/{NCT_ID}/CRC-VAL-HE-7K.zip"
    data = state.blobs[path]
    (tmp_path / "c.zip.part").write_bytes(b"garbage" * 10)
    dest = F.download(base + path, tmp_path / "c.zip", _md5(data), len(data), progress=False)
    assert dest.read_bytes() == data


def test_complete_part_answered_416_is_verified(server, tmp_path):
    state, base = server
    path = f"/files/{NCT_ID}/CRC-VAL-HE-7K.zip"
    data = state.blobs[path]
    (tmp_path / "d.zip.part").write_bytes(data)
    dest = F.download(base + path, tmp_path / "d.zip", _md5(data), progress=False)
    assert dest.read_bytes() == data
    assert _file_requests(state) == [(path, f"bytes={len(data)}-")]


def test_existing_dest_with_right_md5_is_not_downloaded(server, tmp_path):
    state, base = server
    path = f"/files/{NCT_ID}/CRC-VAL-HE-7K.zip"
    data = state.blobs[path]
    (tmp_path / "e.zip").write_bytes(data)
    F.download(base + path, tmp_path / "e.zip", _md5(data), progress=False)
    assert _file_requests(state) == []


def test_pathmnist_uses_medmnist_info(server, tmp_path, monkeypatch):
    medmnist = pytest.importorskip("medmnist")
    state, base = server
    buf = io.BytesIO()
    np.savez(buf, train_images=np.zeros((2, 64, 64, 3), np.uint8), train_labels=np.zeros((2, 1)))
    data = buf.getvalue()
    state.blobs["/pathmnist_64.npz"] = data
    info = {
        **medmnist.INFO["pathmnist"],
        "url_64": f"{base}/pathmnist_64.npz",
        "MD5_64": _md5(data),
    }
    monkeypatch.setitem(medmnist.INFO, "pathmnist", info)
    out = F.fetch("pathmnist", tmp_path, size=64, progress=False)
    npz = F.pathmnist_path(tmp_path, 64)
    assert out == npz.parent == tmp_path / "pathmnist"
    assert npz.name == "pathmnist_64.npz" and F.md5sum(npz) == _md5(data)
    assert F.pathmnist_path(tmp_path, 28).name == "pathmnist.npz"
    assert "pathmnist_64.npz" in json.loads((out / "FETCHED").read_text())["files"]
    seen = len(state.requests)
    F.fetch("pathmnist", tmp_path, size=64, progress=False)
    assert len(state.requests) == seen
    with pytest.raises(UserError, match="size 32"):
        F.fetch("pathmnist", tmp_path, size=32, progress=False)


def test_zip_traversal_is_rejected(tmp_path):
    for bad in ("../evil.png", "/abs/evil.png", "top/../../evil.png"):
        archive = tmp_path / "bad.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("top/ADI/ok.png", _png(1))
            zf.writestr(bad, _png(2))
        with pytest.raises(UserError, match="unsafe member"):
            F.extract_zip(archive, tmp_path / "out" / "train")
        assert not (tmp_path / "out" / "train").exists()
        assert not list(tmp_path.rglob("evil.png"))


def _fake_h5py() -> types.ModuleType:
    """Stand-in for h5py that reads the npz the test server serves as 'h5'."""

    class File:
        def __init__(self, path, mode="r"):
            self._z = np.load(path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._z.close()

        def __getitem__(self, key):
            return self._z[key]

    mod = types.ModuleType("h5py")
    mod.File = File
    return mod


def test_pcam_full_converts_to_imagefolder(server, tmp_path, monkeypatch):
    state, base = server
    monkeypatch.setitem(sys.modules, "h5py", _fake_h5py())
    out = F.fetch("pcam_full", tmp_path, zenodo_api=f"{base}/api", progress=False)
    for split, n in (("train", 4), ("val", 3), ("test", 2)):
        neg = sorted(p.name for p in (out / split / "0_no_tumor").iterdir())
        pos = sorted(p.name for p in (out / split / "1_metastatic_tumor").iterdir())
        assert len(neg) + len(pos) == n and neg[0] == "000000.png" and pos[0] == "000001.png"
    with Image.open(out / "val" / "1_metastatic_tumor" / "000001.png") as im:
        assert im.size == (96, 96) and im.mode == "RGB"
    assert not list((out / "downloads").glob("*.h5"))
    assert len(json.loads((out / "FETCHED").read_text())["files"]) == 6


def test_pcam_without_h5py_names_the_extra(tmp_path, monkeypatch, closed_port):
    monkeypatch.setitem(sys.modules, "h5py", None)
    api = f"http://127.0.0.1:{closed_port}/api"
    with pytest.raises(UserError, match=re.escape("pip install 'histodiffusion[pcam]'")):
        F.fetch("pcam_full", tmp_path, zenodo_api=api, progress=False)


def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(UserError, match="nct_crc_he_100k.*pathmnist.*pcam_full"):
        F.fetch("nope", tmp_path)


def test_download_bad_md5_direct(server, tmp_path):
    state, base = server
    path = f"/files/{NCT_ID}/CRC-VAL-HE-7K.zip"
    with pytest.raises(UserError, match="md5 mismatch for f.zip"):
        F.download(base + path, tmp_path / "f.zip", "0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []
