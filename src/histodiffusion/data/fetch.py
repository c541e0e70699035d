"""Download the public full datasets into a data root, verified by md5, resumable and atomic.

On-disk layout under ``<root>/<name>/``:

* ``nct_crc_he_100k``: ``downloads/{NCT-CRC-HE-100K,CRC-VAL-HE-7K}.zip`` (Zenodo record 1214456),
  unpacked to ``train/<LABEL>/<file>`` and ``test/<LABEL>/<file>``.
* ``pcam_full``: ``downloads/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5.gz``
  (Zenodo record 2546921), converted to ``{train,val,test}/{0_no_tumor,1_metastatic_tumor}/<index>.png``.
* ``pathmnist``: one npz named as medmnist names it (``pathmnist.npz`` for 28 px,
  ``pathmnist_<size>.npz`` otherwise), so ``<root>/pathmnist`` is a valid medmnist root.

Every dataset gets a ``FETCHED`` JSON marker (files and md5s), written last. Md5 values are
never written here: they come from the Zenodo REST API record or from medmnist's ``INFO``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from histodiffusion.errors import UserError
from histodiffusion.io import atomic_path, write_json

DEFAULT_ZENODO_API = "https://zenodo.org/api"
ZENODO_API_ENV = "HISTODIFFUSION_ZENODO_API"
CHUNK = 1 << 20
CONNECT_TIMEOUT = 10.0
PATHMNIST_SIZES = (28, 64, 128, 224)
PCAM_CLASSES = ("0_no_tumor", "1_metastatic_tumor")
USER_AGENT = "histodiffusion-fetch"

_console = Console(stderr=True, emoji=False)
# Errors of a connection that dropped after the response started: retried, resuming on disk.
_DROPPED = (http.client.IncompleteRead, ConnectionError, TimeoutError, socket.timeout)


class DownloadError(UserError):
    """A host that could not be reached or a download that could not be completed."""


class _Restart(Exception):
    """The server resumed at an unusable offset: the partial file was deleted, start again."""


@dataclass(frozen=True)
class FetchSpec:
    """One downloadable dataset: where its files come from and how they are unpacked."""

    kind: str  # "zenodo_zip", "zenodo_pcam" or "medmnist"
    description: str
    record_id: str | None = None
    files: tuple[tuple[str, str], ...] = ()  # (remote file name, split it becomes)
    extra: str | None = None  # optional-dependency group ``histodiffusion[<extra>]``
    module: str | None = None  # module that the extra provides


def _pcam_files() -> tuple[tuple[str, str], ...]:
    """The six PCam archives and the split folder each one feeds."""
    splits = {"train": "train", "valid": "val", "test": "test"}
    return tuple(
        (f"camelyonpatch_level_2_split_{s}_{xy}.h5.gz", d) for s, d in splits.items() for xy in "xy"
    )


DATASETS: dict[str, FetchSpec] = {
    "nct_crc_he_100k": FetchSpec(
        kind="zenodo_zip",
        description="NCT-CRC-HE-100K (train) and CRC-VAL-HE-7K (test), 9 tissue classes",
        record_id="1214456",
        files=(("NCT-CRC-HE-100K.zip", "train"), ("CRC-VAL-HE-7K.zip", "test")),
    ),
    "pcam_full": FetchSpec(
        kind="zenodo_pcam",
        description="PatchCamelyon 96 px patches, tumour vs normal",
        record_id="2546921",
        files=_pcam_files(),
        extra="pcam",
        module="h5py",
    ),
    "pathmnist": FetchSpec(
        kind="medmnist",
        description="PathMNIST npz (28/64/128/224 px) from medmnist",
        extra="medmnist",
        module="medmnist",
    ),
}


# ----------------------------------------------------------------------------- small helpers


def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def pathmnist_path(root: Path, size: int = 64) -> Path:
    """Where the PathMNIST npz of ``size`` px lives (medmnist naming: no suffix for 28 px)."""
    _check_size(size)
    return Path(root) / "pathmnist" / f"pathmnist{_size_flag(size)}.npz"


def _size_flag(size: int) -> str:
    """Medmnist's file/key suffix: '' for 28 px, '_<size>' otherwise."""
    return "" if size == 28 else f"_{size}"


def _check_size(size: int) -> None:
    """Reject PathMNIST sizes that medmnist does not publish."""
    if size not in PATHMNIST_SIZES:
        raise UserError(f"PathMNIST size {size} is not available; choose one of {PATHMNIST_SIZES}")


def _spec(name: str) -> FetchSpec:
    """The registry entry for ``name``, or a UserError listing the known names."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def _require(spec: FetchSpec) -> None:
    """Import the optional module a dataset needs, or say which extra to install."""
    if spec.module is None:
        return
    try:
        __import__(spec.module)
    except ImportError as err:
        raise UserError(
            f"fetching this dataset needs the optional package '{spec.module}': "
            f"run  pip install 'histodiffusion[{spec.extra}]'  and rerun"
        ) from err


def _read_marker(marker: Path) -> dict[str, Any] | None:
    """The FETCHED marker's content, or None when absent or unreadable."""
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _done(marker: Path, names: list[str]) -> bool:
    """True when the marker lists every one of ``names``."""
    data = _read_marker(marker)
    return data is not None and set(names) <= set(data.get("files", {}))


def _write_marker(marker: Path, name: str, files: dict[str, dict]) -> None:
    """Write (or extend) the FETCHED marker; done last so it means 'complete'."""
    old = (_read_marker(marker) or {}).get("files", {})
    write_json(marker, {"dataset": name, "data": str(marker.parent), "files": {**old, **files}})


# ----------------------------------------------------------------------------- download


def _bar(progress: bool) -> Progress:
    """A rich progress bar (bytes, speed, ETA) on stderr; a no-op when ``progress`` is False."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_console,
        disable=not progress,
        transient=True,
    )


def _open(url: str, have: int, timeout: float) -> http.client.HTTPResponse | None:
    """Open ``url`` from byte ``have``; None on 416 (the partial file is already complete)."""
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        return urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        if err.code == 416 and have:
            return None
        raise DownloadError(f"{url} answered HTTP {err.code} {err.reason}") from err
    except URLError as err:
        raise DownloadError(f"cannot reach {url}: {err.reason}") from err


def _start_offset(resp: http.client.HTTPResponse, part: Path, have: int) -> int:
    """Byte offset the response body starts at, trimming or dropping the partial file to match."""
    if resp.status != 206:
        return 0  # the server ignored Range: start over
    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    start = int(m.group(1)) if m else have
    if start > have:
        part.unlink(missing_ok=True)
        raise _Restart(f"server resumed at byte {start}, beyond the {have} bytes on disk")
    return start


def _stream(url: str, part: Path, timeout: float, bar: Progress, task: Any) -> None:
    """Fetch ``url`` into ``part``, resuming from its current size; raise on a dropped stream."""
    have = part.stat().st_size if part.exists() else 0
    resp = _open(url, have, timeout)
    if resp is None:
        return
    with resp:
        start = _start_offset(resp, part, have)
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        bar.update(task, completed=start, total=start + expected if expected is not None else None)
        got = 0
        with open(part, "r+b" if start else "wb") as f:
            f.seek(start)
            f.truncate()
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                got += len(chunk)
                bar.advance(task, len(chunk))
    if expected is not None and got < expected:
        raise http.client.IncompleteRead(b"", expected - got)


def _verify(path: Path, name: str, md5: str | None, size: int | None) -> None:
    """Check size and md5 of a finished download; delete it and raise on a mismatch."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        path.unlink(missing_ok=True)
        raise UserError(
            f"download of {name} has {actual_size} bytes, expected {size} (md5 not checked); "
            "the partial file was deleted, rerun to download it again"
        )
    actual = md5sum(path) if md5 else None
    if md5 and actual != md5.lower():
        path.unlink(missing_ok=True)
        raise UserError(
            f"md5 mismatch for {name}: expected {md5}, got {actual}; the corrupt download was "
            "deleted, rerun to download it again"
        )


def _is_current(dest: Path, md5: str | None, size: int | None) -> bool:
    """True when ``dest`` exists and matches the expected size and md5 (when given)."""
    if not dest.is_file() or (size is not None and dest.stat().st_size != size):
        return False
    return md5 is None or md5sum(dest) == md5.lower()


def download(
    url: str,
    dest: Path,
    md5: str | None,
    size: int | None = None,
    timeout: float = 30,
    progress: bool = True,
    retries: int = 3,
) -> Path:
    """Stream ``url`` to ``dest`` via ``dest.part`` (resumable), verify, then rename atomically."""
    dest = Path(dest)
    if _is_current(dest, md5, size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    if size is not None and part.exists() and part.stat().st_size > size:
        part.unlink()
    with _bar(progress) as bar:
        task = bar.add_task(dest.name, total=size)
        _fetch_with_retries(url, part, timeout, retries, bar, task)
    _verify(part, dest.name, md5, size)
    os.replace(part, dest)
    return dest


def _fetch_with_retries(
    url: str, part: Path, timeout: float, retries: int, bar: Progress, task: Any
) -> None:
    """Run ``_stream`` until it completes, resuming after up to ``retries`` dropped connections."""
    for attempt in range(retries + 1):
        try:
            return _stream(url, part, timeout, bar, task)
        except (*_DROPPED, _Restart) as err:
            if attempt == retries:
                raise DownloadError(
                    f"the connection to {url} dropped {retries + 1} times ({err!r}); rerun to resume "
                    f"from the bytes already saved in {part}"
                ) from err
            _console.print(
                f"[yellow]connection dropped ({err!r}); retrying from byte "
                f"{part.stat().st_size if part.exists() else 0}[/yellow]"
            )


# ----------------------------------------------------------------------------- zenodo


def zenodo_api_url(zenodo_api: str | None = None) -> str:
    """The Zenodo API base: argument, else $HISTODIFFUSION_ZENODO_API, else zenodo.org."""
    return (zenodo_api or os.environ.get(ZENODO_API_ENV) or DEFAULT_ZENODO_API).rstrip("/")


def _entries(files: Any) -> list[dict]:
    """The file entries of a Zenodo record (legacy list or InvenioRDM ``entries`` form)."""
    if isinstance(files, dict):
        files = files.get("entries", {})
        files = list(files.values()) if isinstance(files, dict) else files
    return [f for f in files or [] if isinstance(f, dict) and "key" in f]


def zenodo_files(record_id: str, zenodo_api: str | None = None) -> dict[str, dict]:
    """Map file name -> {url, md5, size} from the Zenodo record metadata (DownloadError if unreachable)."""
    url = f"{zenodo_api_url(zenodo_api)}/records/{record_id}"
    req = Request(url, headers={"Accept": "application/json", "User-Agent": USER_AGENT})
    try:
        with urlopen(req, timeout=CONNECT_TIMEOUT) as resp:
            record = json.loads(resp.read().decode("utf-8"))
    except HTTPError as err:
        raise DownloadError(f"{url} answered HTTP {err.code} {err.reason}") from err
    except URLError as err:
        raise DownloadError(f"cannot reach {url}: {err.reason}") from err
    except (*_DROPPED, ValueError) as err:
        raise DownloadError(f"could not read the record metadata from {url}: {err!r}") from err
    return {f["key"]: _zenodo_entry(f, url) for f in _entries(record.get("files"))}


def _zenodo_entry(entry: dict, record_url: str) -> dict:
    """One Zenodo file entry as {url, md5, size}."""
    links = entry.get("links", {})
    link = links.get("self") or links.get("content") or f"{record_url}/files/{entry['key']}/content"
    algo, _, digest = str(entry.get("checksum", "")).partition(":")
    return {"url": link, "md5": digest if algo == "md5" else None, "size": entry.get("size")}


def _manual_help(name: str, spec: FetchSpec, root: Path, missing: list[str], reason: str) -> str:
    """The offline message: what failed, which URLs, where to put the files by hand."""
    ds, page = Path(root) / name, f"https://zenodo.org/records/{spec.record_id}"
    urls = "\n".join(f"  {page}/files/{f}?download=1" for f in missing)
    msg = (
        f"could not download dataset '{name}': {reason}.\nDownload these files by hand:\n{urls}\n"
        f"and put them in {ds / 'downloads'}/ , then rerun `histodiffusion data fetch {name} "
        f"--data-root {root}` (files placed there are used; without network their md5 cannot be "
        "checked)."
    )
    if spec.kind == "zenodo_zip":
        splits = " and ".join(f"{ds / s}/<LABEL>/<file>" for _, s in spec.files)
        msg += f"\nAlternatively unpack the archives so that the images are at {splits}."
    return msg


# ----------------------------------------------------------------------------- extraction


def _safe_member(name: str, archive: Path) -> PurePosixPath:
    """A zip member name as a relative path; UserError for absolute paths or '..' parts."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", name):
        raise UserError(
            f"{archive} contains the unsafe member '{name}' (absolute path or '..'); refusing to "
            "extract it. Delete the archive and download it again from the official source"
        )
    return p


def _members(zf: zipfile.ZipFile, archive: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """All file members (checked for traversal), minus macOS metadata."""
    out = [(i, _safe_member(i.filename, archive)) for i in zf.infolist()]
    return [(i, p) for i, p in out if not i.is_dir() and "__MACOSX" not in p.parts]


def _strip_top(paths: list[PurePosixPath]) -> int:
    """1 when every member sits under one common top folder, else 0."""
    tops = {p.parts[0] for p in paths if len(p.parts) > 1}
    return int(len(tops) == 1 and all(len(p.parts) > 1 for p in paths))


def extract_zip(archive: Path, dest: Path, strip_top: bool = True) -> Path:
    """Unpack ``archive`` into ``dest`` atomically, dropping a common top folder; no traversal."""
    with zipfile.ZipFile(archive) as zf:
        members = _members(zf, Path(archive))
        cut = _strip_top([p for _, p in members]) if strip_top else 0
        with atomic_path(dest) as tmp:
            tmp.mkdir()
            for info, rel in members:
                out = tmp.joinpath(*rel.parts[cut:])
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    return Path(dest)


def _gunzip(gz: Path) -> Path:
    """Decompress ``x.h5.gz`` to ``x.h5`` beside it (atomically; reused when present)."""
    out = gz.with_suffix("")
    if not out.exists():
        with atomic_path(out) as tmp, gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    return out


def pcam_to_folder(x_h5: Path, y_h5: Path, dest: Path, block: int = 4096) -> Path:
    """Write PCam ``x``/``y`` h5 arrays as ``dest/<class>/<index>.png`` (atomically)."""
    import h5py
    import numpy as np
    from PIL import Image

    with h5py.File(x_h5, "r") as fx, h5py.File(y_h5, "r") as fy, atomic_path(dest) as tmp:
        xs, ys = fx["x"], np.asarray(fy["y"][:]).reshape(-1)
        for cls in PCAM_CLASSES:
            (tmp / cls).mkdir(parents=True)
        for start in range(0, len(ys), block):
            for i, img in enumerate(np.asarray(xs[start : start + block]), start):
                Image.fromarray(img).save(tmp / PCAM_CLASSES[int(ys[i])] / f"{i:06d}.png")
    return Path(dest)


def _unpack(spec: FetchSpec, ds: Path, paths: dict[str, Path]) -> None:
    """Turn the downloaded archives into the split folders that do not exist yet."""
    by_split: dict[str, list[str]] = {}
    for fname, split in spec.files:
        by_split.setdefault(split, []).append(fname)
    for split, fnames in by_split.items():
        if (ds / split).exists():
            continue
        _console.print(f"unpacking {', '.join(fnames)} -> {ds / split}")
        if spec.kind == "zenodo_zip":
            extract_zip(paths[fnames[0]], ds / split)
        else:
            x_h5, y_h5 = (_gunzip(paths[f]) for f in sorted(fnames))
            pcam_to_folder(x_h5, y_h5, ds / split)
            x_h5.unlink(missing_ok=True)
            y_h5.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- fetch


def _zenodo_downloads(
    name: str, spec: FetchSpec, root: Path, zenodo_api: str | None, progress: bool
) -> dict[str, dict]:
    """Download (or pick up by-hand copies of) the record's files; name -> {path, md5, verified}."""
    ds = Path(root) / name
    needed = [f for f, split in spec.files if not (ds / split).exists()]
    if not needed:
        return {}
    try:
        meta = zenodo_files(spec.record_id or "", zenodo_api)
    except DownloadError as err:
        return _placed_files(name, spec, root, needed, str(err))
    out = {}
    for fname in needed:
        if fname not in meta:
            raise UserError(
                f"Zenodo record {spec.record_id} has no file {fname} (it has: {', '.join(meta)}); "
                f"check {zenodo_api_url(zenodo_api)} or set {ZENODO_API_ENV}"
            )
        m = meta[fname]
        try:
            path = download(
                m["url"], ds / "downloads" / fname, m["md5"], m["size"], progress=progress
            )
        except DownloadError as err:
            raise UserError(_manual_help(name, spec, root, needed, str(err))) from err
        out[fname] = {"path": path, "md5": m["md5"], "verified": bool(m["md5"])}
    return out


def _placed_files(
    name: str, spec: FetchSpec, root: Path, needed: list[str], reason: str
) -> dict[str, dict]:
    """Files put in ``downloads/`` by hand, used unverified when Zenodo metadata is unreachable."""
    folder = Path(root) / name / "downloads"
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise UserError(_manual_help(name, spec, root, missing, reason))
    _console.print(
        f"[yellow]warning: {reason}; using the files in {folder} WITHOUT md5 verification[/yellow]"
    )
    return {f: {"path": folder / f, "md5": None, "verified": False} for f in needed}


def _fetch_zenodo(
    name: str, spec: FetchSpec, root: Path, zenodo_api: str | None, progress: bool
) -> Path:
    """Download, verify and unpack a Zenodo-hosted dataset, then write its marker."""
    ds = Path(root) / name
    got = _zenodo_downloads(name, spec, root, zenodo_api, progress)
    _unpack(spec, ds, {f: g["path"] for f, g in got.items()})
    files = {f: {"md5": g["md5"], "verified": g["verified"]} for f, g in got.items()}
    kept = {"md5": None, "verified": None, "note": "split folder was already present"}
    files.update({f: kept for f, _ in spec.files if f not in files})
    _write_marker(ds / "FETCHED", name, files)
    return ds


def _fetch_pathmnist(root: Path, size: int, progress: bool) -> Path:
    """Download the PathMNIST npz of ``size`` px with medmnist's URL and MD5."""
    from medmnist import INFO

    info, flag, dest = INFO["pathmnist"], _size_flag(size), pathmnist_path(root, size)
    url, md5 = info[f"url{flag}"], info[f"MD5{flag}"]
    try:
        download(url, dest, md5, progress=progress)
    except DownloadError as err:
        raise UserError(
            f"could not download dataset 'pathmnist': {err}.\nDownload {url} by hand (md5 {md5}) "
            f"and save it as {dest}, then rerun `histodiffusion data fetch pathmnist --size {size} "
            f"--data-root {root}`."
        ) from err
    _write_marker(dest.parent / "FETCHED", "pathmnist", {dest.name: {"md5": md5, "verified": True}})
    return dest.parent


def _already_fetched(name: str, spec: FetchSpec, root: Path, size: int) -> bool:
    """True when the FETCHED marker already covers this request (and the npz is there)."""
    if spec.kind != "medmnist":
        return _done(root / name / "FETCHED", [f for f, _ in spec.files])
    npz = pathmnist_path(root, size)
    return npz.is_file() and _done(npz.parent / "FETCHED", [npz.name])


def fetch(
    name: str,
    root: Path,
    *,
    size: int = 64,
    zenodo_api: str | None = None,
    progress: bool = True,
) -> Path:
    """Download, verify and unpack dataset ``name`` under ``root``; return ``<root>/<name>``."""
    spec, root = _spec(name), Path(root)
    if spec.kind == "medmnist":
        _check_size(size)
    ds = root / name
    if _already_fetched(name, spec, root, size):
        _console.print(f"{name} is already fetched: the data is in {ds}")
        return ds
    _require(spec)
    if spec.kind == "medmnist":
        out = _fetch_pathmnist(root, size, progress)
    else:
        out = _fetch_zenodo(name, spec, root, zenodo_api, progress)
    _console.print(f"[green]{name} fetched into {out}[/green]")
    return out
