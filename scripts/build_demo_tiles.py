"""Build the demo tiles shipped in the package (src/histodiffusion/data/demo) from the shared data.

    python scripts/build_demo_tiles.py --data-root ../shared/data [--size 32]

Target (labeled, 8 classes): every Kather 2016 texture tile (CC BY 4.0). Pool (unlabeled): the
NCT-CRC-HE sample (CC BY 4.0) and tissue tiles cut from the unlabeled large fields (150 px tiles,
at least half tissue). Every tile is centre-cropped and resized to --size px and written as PNG;
``manifest.csv`` lists path, label, group (the source image of a Kather tile where its name
carries one, else the tile itself) and the licence of each file.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import tempfile
from pathlib import Path

from histodiffusion.data.images import load_tile, save_png
from histodiffusion.data.sources import read_named
from histodiffusion.data.tiling import tile_files

OUT = Path(__file__).resolve().parents[1] / "src" / "histodiffusion" / "data" / "demo"
LICENCES = {
    "kather2016": "CC-BY-4.0 (Kather et al. 2016, doi:10.1038/srep27988)",
    "nct_crc_he": "CC-BY-4.0 (Kather et al. 2019, NCT-CRC-HE-100K, doi:10.5281/zenodo.1214456)",
}


def group_of(name: str) -> str:
    """The slide a Kather 2016 tile was cut from (CRC-Prim-HE-07 in ..._CRC-Prim-HE-07_022.tif_Row_...),
    else the tile's own name (the originals of the 2016 release carry no source)."""
    m = re.search(r"(CRC-Prim-HE-\d+)", name)
    return m.group(1) if m else Path(name).stem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    shutil.rmtree(OUT / "target", ignore_errors=True)
    shutil.rmtree(OUT / "pool", ignore_errors=True)
    rows = []
    for r in read_named("kather2016", args.data_root):
        rel = f"target/{r.label}/{Path(r.path).stem.replace('.tif_', '_')}.png"
        save_png(OUT / rel, load_tile(r.path, args.size))
        rows.append({"path": rel, "label": r.label, "group": group_of(Path(r.path).name),
                     "licence": LICENCES["kather2016"]})
    for r in read_named("nct_crc_he", args.data_root):
        rel = f"pool/nct_crc_he_{Path(r.path).stem}.png"
        save_png(OUT / rel, load_tile(r.path, args.size))
        rows.append({"path": rel, "label": "", "group": "", "licence": LICENCES["nct_crc_he"]})
    fields = [Path(r.path) for r in read_named("unlabeled_he", args.data_root)]
    with tempfile.TemporaryDirectory() as tmp:
        tile_files(fields, Path(tmp), 150, None, 0.5, "manifest", label="unlabeled", progress=False)
        for tile in sorted(Path(tmp).rglob("*.png")):
            rel = f"pool/fields_{tile.stem}.png"
            save_png(OUT / rel, load_tile(tile, args.size))
            rows.append({"path": rel, "label": "", "group": "", "licence": "see README.md (unlabeled_he)"})
    with open(OUT / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "group", "licence"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} tiles in {OUT}")


if __name__ == "__main__":
    main()
