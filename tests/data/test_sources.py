"""Image sources (data/sources.py): CSV manifests as spreadsheets save them, and labels as folder names."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from histodiffusion.data.sources import label_folder, label_folders, read_csv_manifest
from histodiffusion.errors import UserError
from tests.helpers import write_image


def _manifest(tmp_path: Path, text: str, encoding: str) -> Path:
    write_image(tmp_path / "a" / "caf\u00e9.png", np.zeros((8, 8, 3), np.uint8))
    path = tmp_path / "m.csv"
    path.write_bytes(text.encode(encoding))
    return path


def test_csv_with_byte_order_mark_reads_its_path_column(tmp_path: Path) -> None:
    """Excel's 'CSV UTF-8' starts with a byte-order mark: the first column is still 'path'."""
    path = _manifest(tmp_path, "path,label\r\na/caf\u00e9.png,tumor\r\n", "utf-8-sig")
    [record] = read_csv_manifest(path)
    assert record.label == "tumor" and record.path == str((tmp_path / "a" / "caf\u00e9.png").resolve())


@pytest.mark.parametrize(("encoding", "said"), [("cp1252", "is not UTF-8 text (byte 0xe9 on line 2"),
                                                ("utf-16", "is UTF-16 text, not UTF-8")])
def test_csv_in_another_encoding_names_the_file(tmp_path: Path, encoding: str, said: str) -> None:
    path = _manifest(tmp_path, "path,label\r\na/caf\u00e9.png,tumor\r\n", encoding)
    with pytest.raises(UserError, match=re.escape(f"{path} {said}") + ".*save it as UTF-8"):
        read_csv_manifest(path)


def test_labels_become_safe_folder_names() -> None:
    assert label_folder("0_no_tumor") == "0_no_tumor" and label_folder("Low grade IN") == "Low_grade_IN"
    assert label_folder("../../x") == "x" and label_folder("a/b\\c") == "a_b_c" and label_folder("..") == ""
    assert label_folders(["tumor", "../etc"]) == {"tumor": "tumor", "../etc": "etc"}
    with pytest.raises(UserError, match="label '/../' has no character usable in a folder name"):
        label_folders(["tumor", "/../"])
    with pytest.raises(UserError, match="labels 'a/b' and 'a b' would share the folder name 'a_b'"):
        label_folders(["a/b", "a b"])


def test_the_demo_tiles_ship_with_the_package_and_need_no_data_root(tmp_path) -> None:
    """'demo' and 'demo_pool' resolve with no data root: 364 labeled Kather 2016 tiles in 8 classes
    with their slide as group, 291 unlabeled pool tiles, 32 px PNGs, a licence README beside them."""
    from histodiffusion.data.images import read_rgb
    from histodiffusion.data.sources import DEMO, read_named

    target = read_named("demo", tmp_path / "does-not-exist")
    pool = read_named("demo_pool", tmp_path / "does-not-exist")
    assert len(target) == 364 and len({r.label for r in target}) == 8 and all(r.group for r in target)
    assert len({r.group for r in target if "CRC-Prim-HE" in r.group}) == 10
    assert len(pool) == 291 and all(r.label is None and r.group is None for r in pool)
    assert read_rgb(target[0].path).shape == (32, 32, 3) and read_rgb(pool[-1].path).shape == (32, 32, 3)
    readme = (DEMO / "README.md").read_text()
    assert "CC BY 4.0" in readme and "doi:10.1038/srep27988" in readme
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) < 3_000_000
