"""What data a run saw: content digests of the files the data stage reads, and its fingerprint.

The data stage hashes every image it reads (sha1 of the file's bytes; of one array row for an
``.npz`` record), so that its guards compare images by content, not by name. ``fingerprint.json``
in its folder lists each input file with its size, modification time and digest, and each
manifest and tile-cache file it wrote with its size and digest. A rerun that finds the stage done
compares the input files again, re-hashing only those whose size or modification time moved, and
names the ones that changed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from histodiffusion import io
from histodiffusion.data.sources import NPZ_SEP, npz_row
from histodiffusion.progress import progress_bar

FINGERPRINT = "fingerprint.json"


def file_digest(path: str | os.PathLike) -> str:
    """sha1 of a file's bytes (read in blocks)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_digest(path: str) -> str | None:
    """sha1 of one record's image bytes (its array row for ``file.npz::split/index``); None when
    unreadable (the tile cache reports those)."""
    try:
        if NPZ_SEP not in path:
            return file_digest(path)
        return hashlib.sha1(npz_row(path).tobytes()).hexdigest()
    except (OSError, KeyError, IndexError, ValueError):
        return None


def digests(paths: Sequence[str], description: str = "hashing", progress: bool = True) -> dict[str, str]:
    """Content digest of each readable record path."""
    out = {}
    with progress_bar(description, total=len(paths), enabled=progress and len(paths) > 1000,
                      unit="files") as advance:
        for p in paths:
            d = record_digest(p)
            if d is not None:
                out[p] = d
            advance(1)
    return out


def _facts(path: str, digest: str | None = None) -> dict | None:
    try:
        st = os.stat(path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": digest or file_digest(path)}
    except OSError:
        return None


def input_facts(paths: Iterable[str], known: dict[str, str]) -> dict[str, dict]:
    """Size, modification time and digest of each input file (an ``.npz`` record's file once);
    ``known`` digests of plain files are reused."""
    files = sorted({p.partition(NPZ_SEP)[0] for p in paths})
    out = {}
    for f in files:
        facts = _facts(f, known.get(f))
        if facts is not None:
            out[f] = facts
    return out


def output_facts(folder: Path, patterns: Sequence[str]) -> dict[str, dict]:
    """Size and digest of the stage's written files matching ``patterns`` (relative names)."""
    out = {}
    for pattern in patterns:
        for p in sorted(folder.glob(pattern)):
            if p.is_file():
                out[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha1": file_digest(p)}
    return out


def write_fingerprint(folder: Path, inputs: dict[str, dict], outputs: dict[str, dict]) -> Path:
    """Write ``folder/fingerprint.json``."""
    return io.write_json(folder / FINGERPRINT, {"inputs": inputs, "outputs": outputs})


def content_digest(inputs: dict[str, dict], manifests: dict[str, Iterable]) -> str:
    """16 hex digits of sha256 over the sorted (size, sha1) of the input files and, for each row of
    each manifest (``{role: records}``, role = a split or the pool), its role, label and the content
    it points at: the same for the same data, labels and splits wherever the files lie and whenever
    they were copied (paths and modification times left out)."""
    facts = sorted(f"{v['size']}:{v['sha1']}" for v in inputs.values())
    rows = []
    for role, records in manifests.items():
        for r in records:
            file, sep, rest = r.path.partition(NPZ_SEP)
            content = inputs.get(file, {}).get("sha1", Path(file).name) + sep + rest
            rows.append(f"{role}\t{r.label or ''}\t{content}")
    return hashlib.sha256("\n".join(facts + sorted(rows)).encode()).hexdigest()[:16]


def changed_inputs(folder: Path) -> tuple[list[str], list[str]] | None:
    """(changed, missing) input files since the fingerprint was written; None without one.

    A file whose size and modification time are as recorded counts as unchanged; any other is
    re-hashed, so a copied but identical file is not reported.
    """
    path = folder / FINGERPRINT
    if not path.is_file():
        return None
    changed, missing = [], []
    for f, old in io.read_json(path).get("inputs", {}).items():
        try:
            st = os.stat(f)
        except OSError:
            missing.append(f)
            continue
        if st.st_size == old["size"] and st.st_mtime_ns == old["mtime_ns"]:
            continue
        if st.st_size != old["size"] or file_digest(f) != old["sha1"]:
            changed.append(f)
    return changed, missing
