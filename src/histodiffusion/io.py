"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from histodiffusion.errors import UserError

# Words of a full disk in the errors that wrap an OSError without its errno: safetensors
# ("IoError(Os { code: 28, kind: StorageFull ...") and torch's C++ writers.
_NO_SPACE_WORDS = ("no space left", "enospc", "errno 28", "os error 28", "code: 28", "storagefull")


def is_no_space(err: BaseException) -> bool:
    """True when ``err`` (an OSError, or safetensors'/torch's own wrapping of one) is a full disk."""
    for e in (err, err.__cause__, err.__context__):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
    text = str(err).lower()
    return any(w in text for w in _NO_SPACE_WORDS)


def disk_full(path: str | os.PathLike | None = None) -> UserError:
    """The message of a full disk while writing ``path``."""
    return UserError(
        f"no space left on the device{f' while writing {path}' if path else ''}. Free some space and rerun the same "
        "command; nothing finished is lost (finished stages, tiles and checkpoints are kept and the "
        "run resumes)."
    )


def _nearly_full(folder: Path) -> bool:
    """True when less than 1 MiB is free where ``folder`` lives (a C++ writer's bare 'write failed')."""
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"nothing was written to the temporary path for {path}")
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    except UserError:
        raise
    except Exception as err:
        if is_no_space(err) or ("write failed" in str(err) and _nearly_full(path.parent)):
            raise disk_full(path) from err
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsync before rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as YAML to ``path`` atomically."""
    return write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (a byte-order mark, as Excel writes, is dropped); any other encoding is a
    user error naming the file."""
    path = Path(path)
    data = path.read_bytes()
    how = "save it as UTF-8" + (" (in Excel: 'CSV UTF-8')" if path.suffix.lower() == ".csv" else "") + " and rerun"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path} is UTF-16 text, not UTF-8; {how}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}; Latin-1 or "
                        f"Windows-1252, perhaps); {how}") from None


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with a clear error when it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise UserError(f"{path} does not exist") from err
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete it and rerun the stage") from err


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line (flushed; a torn last line is ignored by ``read_jsonl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file, skipping a truncated last line left by an interrupted run."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def weights_hash(folder: str | os.PathLike) -> str:
    """Short sha256 of a model folder's ``*.safetensors`` weights (names sorted): which weights made a result."""
    import hashlib

    h = hashlib.sha256()
    for w in sorted(Path(folder).glob("*.safetensors")):
        with open(w, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]
