"""Image sources: ImageFolder trees, CSV manifests, PathMNIST-format .npz files, named datasets.

Every source is read into a list of :class:`Record` (absolute path, label, group, split). Named
datasets resolve under the data root: ``--data-root``, else ``HISTODIFFUSION_DATA``, else the
user cache folder. A root ``manifest.csv`` (as in the shared benchmark data) supplies case ids.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from dataclasses import asdict, dataclass, replace
from io import StringIO
from pathlib import Path

import numpy as np

from histodiffusion import io
from histodiffusion.data.images import ImageReadError, is_image_file, load_tile, resize_square
from histodiffusion.errors import UserError

NAMED_DATASETS = {
    "pcam": "PatchCamelyon sample: lymph-node sections, tumour vs normal (train/valid/test)",
    "ebhi": "EBHI-Seg: colorectal biopsies, 6 classes, case ids in manifest.csv",
    "lc25000": "LC25000: lung and colon, 5 classes (rotated/flipped near-duplicates: pool only)",
    "nct_crc_he": "NCT-CRC-HE: colorectal tissue, 9 classes",
    "kather2016": "Kather 2016: colorectal texture, 8 classes",
    "unlabeled_he": "unlabeled tiles and large fields (tile them)",
    "pathmnist": "PathMNIST (MedMNIST): NCT-CRC-HE at 28-224 px, 9 classes; `histodiffusion data fetch pathmnist`",
    "nct_crc_he_100k": "NCT-CRC-HE-100K (train) + CRC-VAL-HE-7K (test); `histodiffusion data fetch nct_crc_he_100k`",
    "pcam_full": "PatchCamelyon, all 327,680 tiles; `histodiffusion data fetch pcam_full`",
    "demo": "shipped with the package (no data root): Kather 2016 colorectal texture, 8 classes, 364 tiles at 32 px",
    "demo_pool": "shipped with the package (no data root): 291 unlabeled H&E tiles at 32 px, the demo's pool",
}
DEMO = Path(__file__).resolve().parent / "demo"  # package data: tiles, manifest.csv, README.md (licences)
SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "val": "valid",
                 "validation": "valid", "test": "test", "testing": "test"}
PATHMNIST_LABELS = ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth_muscle",
                    "normal_colon_mucosa", "cancer_associated_stroma",
                    "colorectal_adenocarcinoma_epithelium")
PATHMNIST_SIZES = (28, 64, 128, 224)
NPZ_SEP = "::"


@dataclass(frozen=True)
class Record:
    """One tile: absolute path (``file.npz::split/index`` for arrays), label, case id, split."""

    path: str
    label: str | None = None
    group: str | None = None
    split: str | None = None
    source: str = ""
    weight: float = 1.0

    def with_(self, **changes) -> Record:
        """Copy with fields changed."""
        return replace(self, **changes)


def label_folder(label: str) -> str:
    """A label as a folder name: runs of characters other than letters, digits, '-', '_' and '.'
    become '_', leading and trailing dots and underscores go ('../../x' -> 'x'); at most 100 characters."""
    return re.sub(r"[^\w.-]+", "_", label).strip("._")[:100]


def label_folders(labels: list[str]) -> dict[str, str]:
    """Each label's folder name (:func:`label_folder`); refuses a label with none and two labels with one."""
    out: dict[str, str] = {}
    for label in labels:
        name = label_folder(label)
        if not name:
            raise UserError(f"label {label!r} has no character usable in a folder name; rename it "
                            "(letters, digits, '-', '_', '.')")
        clash = [other for other, n in out.items() if n == name]
        if clash:
            raise UserError(f"labels {clash[0]!r} and {label!r} would share the folder name {name!r}; "
                            "rename one of them")
        out[label] = name
    return out


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: explicit value, else ``HISTODIFFUSION_DATA``, else the user cache folder."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("HISTODIFFUSION_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "histodiffusion" / "data"


# ------------------------------------------------------------------------------ ImageFolder
def _split_name(name: str) -> str | None:
    return SPLIT_ALIASES.get(name.lower())


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def read_imagefolder(root: Path, source: str = "") -> list[Record]:
    """Read ``<root>/[<split>/]<label>/<file>``; files directly under a split or root are unlabeled."""
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    has_splits = bool(subdirs) and all(_split_name(p.name) for p in subdirs)
    parts = [(p, _split_name(p.name)) for p in subdirs] if has_splits else [(root, None)]
    records: list[Record] = []
    for folder, split in parts:
        for f in sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p)):
            records.append(Record(str(f.resolve()), None, None, split, source))
        for label_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = _files(label_dir)
            if not files:
                raise UserError(
                    f"class folder {label_dir} holds no images (expected files ending in "
                    ".tif .tiff .png .jpg .jpeg .bmp); remove the empty folder or add its images"
                )
            records += [Record(str(f.resolve()), label_dir.name, None, split, source) for f in files]
    if not records:
        raise UserError(f"no images found under {root} (expected <root>/[<split>/]<label>/<file>)")
    return records


# ---------------------------------------------------------------------------- CSV manifests
def read_csv_manifest(path: Path, source: str = "", dataset: str | None = None) -> list[Record]:
    """Read ``path,label[,group][,split]`` rows; relative paths are relative to the CSV's folder.

    When the CSV has a ``dataset`` column (the shared benchmark manifest), only rows of
    ``dataset`` are read.
    """
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    reader = csv.DictReader(StringIO(io.read_text(path), newline=""))
    cols = set(reader.fieldnames or [])
    if not {"path", "label"} <= cols:
        raise UserError(f"manifest {path}: needs columns 'path' and 'label' (optional 'group', "
                        f"'split'); found {sorted(cols)}")
    rows = list(reader)
    records = []
    for i, row in enumerate(rows, start=2):
        if dataset is not None and row.get("dataset") != dataset:
            continue
        if not row["path"]:
            raise UserError(f"manifest {path}, line {i}: empty 'path'")
        p = Path(row["path"])
        p = p if p.is_absolute() else path.parent / p
        split = row.get("split") or None
        if split is not None and _split_name(split) is None:
            raise UserError(f"manifest {path}, line {i}: split {split!r} is not one of train/valid/test")
        records.append(Record(str(p.resolve()), row["label"] or None, row.get("group") or None,
                              _split_name(split) if split else None, source))
    if not records:
        raise UserError(f"manifest {path} has no rows" + (f" for dataset {dataset!r}" if dataset else ""))
    return records


def write_manifest(path: Path, records: list[Record]) -> None:
    """Write records as a CSV manifest atomically (absolute paths)."""
    from histodiffusion.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "group", "split", "source", "weight"])
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})


def read_manifest(path: Path) -> list[Record]:
    """Read a manifest written by :func:`write_manifest`."""
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist; run `histodiffusion data prepare` first")
    with open(path, newline="", encoding="utf-8") as f:
        return [Record(r["path"], r["label"] or None, r["group"] or None, r["split"] or None,
                       r["source"], float(r["weight"] or 1.0)) for r in csv.DictReader(f)]


# ----------------------------------------------------------------------- PathMNIST (.npz)
def read_pathmnist(path: Path, source: str = "pathmnist") -> list[Record]:
    """Records for a MedMNIST-format npz (``{train,val,test}_{images,labels}``)."""
    if not path.is_file():
        raise UserError(f"PathMNIST file {path} does not exist; run `histodiffusion data fetch pathmnist`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            labels = {s: np.asarray(npz[f"{s}_labels"]).reshape(-1) for s in ("train", "val", "test")
                      if f"{s}_labels" in keys}
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable .npz file ({err}); delete it and fetch it again") from err
    if not labels:
        raise UserError(f"{path}: expected arrays train_images/train_labels (MedMNIST format), found {sorted(keys)}")
    records = []
    for split, ys in labels.items():
        for i, y in enumerate(ys):
            name = PATHMNIST_LABELS[int(y)] if int(y) < len(PATHMNIST_LABELS) else str(int(y))
            records.append(Record(f"{path.resolve()}{NPZ_SEP}{split}/{i}", name, None,
                                  _split_name(split), source))
    return records


@functools.lru_cache(maxsize=4)
def _npz_array(path: str, key: str) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        return np.asarray(npz[key])


def pathmnist_file(root: Path, resolution: int, fetch_missing: bool = True) -> Path:
    """The smallest PathMNIST file at or above ``resolution`` under ``root``; fetched on first use.

    Without network the fetch fails within seconds, and the message says how to use local data.
    """
    from histodiffusion.data.fetch import pathmnist_path

    have = [s for s in PATHMNIST_SIZES if pathmnist_path(root, s).is_file()]
    above = [s for s in have if s >= resolution]
    if above or (have and not fetch_missing):
        return pathmnist_path(root, min(above) if above else max(have))
    size = min([s for s in PATHMNIST_SIZES if s >= resolution] or [max(PATHMNIST_SIZES)])
    if not fetch_missing:
        raise UserError(f"PathMNIST is not under the data root {root}")
    from histodiffusion.data.fetch import fetch

    try:
        fetch("pathmnist", root, size=size)
    except UserError as err:
        raise UserError(
            f"PathMNIST ({size} px) is not under the data root {root} and could not be fetched:\n{err}\n"
            f"To use local data instead: put pathmnist_{size}.npz (MedMNIST format) in {root / 'pathmnist'}, "
            "point --data-root / HISTODIFFUSION_DATA at a folder holding pathmnist/, or give "
            "data.target.path (an ImageFolder, a CSV manifest or a .npz)."
        ) from err
    return pathmnist_path(root, size)


# --------------------------------------------------------------------------- named datasets
def read_named(name: str, root: Path, resolution: int = 64) -> list[Record]:
    """Records of a named dataset under ``root`` (manifest.csv rows when present, else folders)."""
    if name not in NAMED_DATASETS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(NAMED_DATASETS)} (or give 'path:')")
    if name in ("demo", "demo_pool"):
        return read_demo(name)
    if not root.is_dir() and name != "pathmnist":
        raise UserError(
            f"data root {root} does not exist. Point --data-root or HISTODIFFUSION_DATA at the folder "
            f"that holds {name}/ (for example ../shared/data), or fetch it: histodiffusion data fetch NAME"
        )
    if name == "pathmnist":
        return read_pathmnist(pathmnist_file(root, resolution), source=name)
    folder = root / name
    if not folder.is_dir():
        hint = f"run `histodiffusion data fetch {name}`" if "fetch" in NAMED_DATASETS[name] else \
            f"place the dataset at {folder}/[<split>/]<label>/<file>"
        raise UserError(f"dataset {name!r} not found: {folder} does not exist under the data root; {hint}")
    manifest = root / "manifest.csv"
    if manifest.is_file():
        cols = csv.DictReader(StringIO(io.read_text(manifest), newline="")).fieldnames or []
        if "dataset" in cols:
            records = _named_from_manifest(manifest, name, root)
            if records:
                return records
    return read_imagefolder(folder, source=name)


def read_demo(name: str) -> list[Record]:
    """The demo tiles shipped in the package: 'demo' (labeled, with groups) or 'demo_pool' (unlabeled)."""
    records = read_csv_manifest(DEMO / "manifest.csv", source=name)
    wanted = [r for r in records if (r.label is not None) == (name == "demo")]
    return [r if name == "demo" else r.with_(group=None) for r in wanted]


def _named_from_manifest(manifest: Path, name: str, root: Path) -> list[Record]:
    try:
        return read_csv_manifest(manifest, source=name, dataset=name)
    except UserError:
        return []


def read_source(dataset: str | None, path: str | None, fmt: str, root: Path, resolution: int,
                name: str) -> list[Record]:
    """Records of one configured source (``dataset`` under the root, or ``path``)."""
    if dataset is not None:
        return read_named(dataset, root, resolution)
    p = Path(path).expanduser()  # type: ignore[arg-type]
    if fmt == "auto":
        fmt = "pathmnist" if p.suffix == ".npz" else "csv" if p.suffix == ".csv" else "imagefolder"
    if fmt == "pathmnist":
        return read_pathmnist(p, source=name)
    if fmt == "csv":
        return read_csv_manifest(p, source=name)
    return read_imagefolder(p, source=name)


# ------------------------------------------------------------------------------ decoding
def npz_row(path: str) -> np.ndarray:
    """The image array of a ``file.npz::split/index`` record, as stored."""
    file, _, ref = path.partition(NPZ_SEP)
    split, _, index = ref.partition("/")
    return _npz_array(file, f"{split}_images")[int(index)]


def load_record(record: Record | str, resolution: int) -> np.ndarray:
    """Decode one record's tile at ``resolution`` (H, W, 3) uint8; raises ImageReadError."""
    path = record.path if isinstance(record, Record) else record
    if NPZ_SEP in path:
        try:
            arr = npz_row(path)
        except (OSError, KeyError, IndexError, ValueError) as err:
            raise ImageReadError(f"{path}: cannot read array ({err})") from err
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        return resize_square(np.ascontiguousarray(arr.astype(np.uint8)), resolution)
    return load_tile(path, resolution)
