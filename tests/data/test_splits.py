"""Splits, label budgets and guards (data/splits.py, data/sources.py), on the real shared manifests where possible."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from histodiffusion.data import splits as sp
from histodiffusion.data.sources import Record, read_imagefolder, read_named
from histodiffusion.errors import UserError
from tests.helpers import write_image


@pytest.fixture(scope="module")
def ebhi(data_root: Path) -> list[Record]:
    return read_named("ebhi", data_root)


@pytest.fixture(scope="module")
def pcam(data_root: Path) -> list[Record]:
    return read_named("pcam", data_root)


def test_named_datasets_read_groups_and_splits(ebhi, pcam) -> None:
    assert len(ebhi) == 2227 and all(r.group and r.group.startswith("GT") for r in ebhi)
    assert Counter(r.split for r in pcam) == {"train": 12000, "valid": 2907, "test": 2947}


def test_group_split_keeps_cases_together_and_is_seeded(ebhi) -> None:
    splits, mode = sp.split_target(ebhi, "auto", (0.6, 0.2, 0.2), seed=0)
    assert mode == "group"
    sp.check_group_leakage(splits)  # does not raise
    groups = {s: {r.group for r in rs} for s, rs in splits.items()}
    assert not (groups["train"] & groups["test"]) and not (groups["valid"] & groups["test"])
    assert sum(len(v) for v in splits.values()) == len(ebhi)
    n = len(ebhi)
    assert abs(len(splits["train"]) / n - 0.6) < 0.06 and abs(len(splits["test"]) / n - 0.2) < 0.06
    for s in sp.SPLITS:  # every class reaches every split
        assert {r.label for r in splits[s]} == {r.label for r in ebhi}
    again, _ = sp.split_target(ebhi, "group", (0.6, 0.2, 0.2), seed=0)
    other, _ = sp.split_target(ebhi, "group", (0.6, 0.2, 0.2), seed=1)
    assert [r.path for r in again["test"]] == [r.path for r in splits["test"]]
    assert {r.path for r in other["test"]} != {r.path for r in splits["test"]}


def test_group_leakage_is_refused(ebhi) -> None:
    splits, _ = sp.split_target(ebhi, "group", (0.6, 0.2, 0.2), seed=0)
    leaked = splits["train"][0]
    splits["test"].append(leaked.with_(split="test"))
    with pytest.raises(UserError, match=f"case '{leaked.group}' is in both the train and the test split"):
        sp.check_group_leakage(splits)


def test_pcam_labeled_budgets_are_stratified_and_nested(pcam) -> None:
    splits, mode = sp.split_target(pcam, "auto", (0.6, 0.2, 0.2), seed=0)
    assert mode == "own"
    one = sp.labeled_subset(splits["train"], 0.01, seed=0)
    five = sp.labeled_subset(splits["train"], 0.05, seed=0)
    assert Counter(r.label for r in one) == {"0_no_tumor": 60, "1_metastatic_tumor": 60}
    assert len(five) == 600
    assert {r.path for r in one} <= {r.path for r in five}
    assert {r.path for r in sp.labeled_subset(splits["train"], 0.01, seed=1)} != {r.path for r in one}
    assert Counter(r.label for r in sp.labeled_subset(splits["train"], 7, seed=0)) == {
        "0_no_tumor": 7, "1_metastatic_tumor": 7}


def test_class_missing_from_labeled_subset_is_refused(ebhi) -> None:
    splits, _ = sp.split_target(ebhi, "group", (0.6, 0.2, 0.2), seed=0)
    tiny = sp.labeled_subset(splits["train"], 0.01, seed=0)  # 1% of 50 Normal images rounds to 0
    with pytest.raises(UserError, match=r"class 'Normal' has no labeled images at budget 0\.01"):
        sp.check_classes_present(tiny, splits["train"], 0.01)


def test_target_file_in_pool_is_refused(ebhi, data_root: Path) -> None:
    pool = read_named("kather2016", data_root) + [ebhi[3].with_(source="sneaky", label=None)]
    with pytest.raises(UserError, match=r"1 file\(s\) of the target dataset 'ebhi' are in the pre-training pool"):
        sp.check_pool_disjoint(pool, ebhi, "ebhi")
    sp.check_pool_disjoint(read_named("kather2016", data_root), ebhi, "ebhi")


def test_stratified_split_without_groups(data_root: Path) -> None:
    nct = read_named("nct_crc_he", data_root)
    splits, mode = sp.split_target(nct, "auto", (0.6, 0.2, 0.2), seed=0)
    assert mode == "stratified"
    assert sum(map(len, splits.values())) == len(nct) == 158
    for s in sp.SPLITS:
        assert len({r.label for r in splits[s]}) == 9


def test_imagefolder_empty_class_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "ADI").mkdir()
    write_image(tmp_path / "TUM" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(UserError, match=r"class folder .*ADI holds no images"):
        read_imagefolder(tmp_path)


def test_weighted_sample_prefers_heavier_sources() -> None:
    records = [Record(f"a{i}", weight=1.0) for i in range(500)] + [Record(f"b{i}", weight=9.0) for i in range(500)]
    picked = sp.weighted_sample(records, 200, seed=0)
    assert len(picked) == 200
    assert sum(r.path.startswith("b") for r in picked) > 150


def test_ladder_rungs_are_nested_supersets_of_the_budget(pcam) -> None:
    """The evaluate stage's real-label ladder: each rung contains the budget's subset and the rung below it."""
    from histodiffusion.stages.evaluate import ladder_subset, rung_budget

    splits, _ = sp.split_target(pcam, "auto", (0.6, 0.2, 0.2), seed=0)
    train = splits["train"]
    assert rung_budget(0.01, 2) == 0.02 and rung_budget(0.4, 4) == 1.0 and rung_budget(8, 2.5) == 20
    budget = {r.path for r in sp.labeled_subset(train, 0.01, seed=0)}  # what stage labels draws
    rungs = [{r.path for r in ladder_subset(train, 0.01, m, seed=0)} for m in (2, 4, None)]
    assert budget < rungs[0] < rungs[1] < rungs[2] == {r.path for r in train}
    assert [len(r) for r in rungs] == [240, 480, 12000]
    per_class = Counter(r.label for r in ladder_subset(train, 0.01, 4, seed=0))
    assert per_class == {"0_no_tumor": 240, "1_metastatic_tumor": 240}


def test_practical_protocol_pool_guard(pcam) -> None:
    """A valid or test tile in the pool is refused; target train tiles outside the budgets are allowed."""
    splits, _ = sp.split_target(pcam, "auto", (0.6, 0.2, 0.2), seed=0)
    held_out = splits["valid"] + splits["test"]
    unlabeled = [r.with_(label=None, split=None, source="pcam train, unlabeled") for r in splits["train"][:50]]
    sp.check_pool_excludes(unlabeled, held_out, "pcam")
    for leaked in (splits["valid"][7], splits["test"][3]):
        pool = unlabeled + [leaked.with_(label=None, source="pcam train, unlabeled")]
        with pytest.raises(UserError, match=r"1 valid or test file\(s\) of the target 'pcam' would enter the pre-"):
            sp.check_pool_excludes(pool, held_out, "pcam")


def test_dedupe_drops_repeated_rows_and_refuses_conflicting_ones() -> None:
    a, b = Record("/d/a.png", "tumor"), Record("/d/b.png", "normal")
    kept, repeated = sp.dedupe([a, b, a], "m")
    assert kept == [a, b] and repeated == ["/d/a.png"]
    with pytest.raises(UserError, match=r"source 'm' lists 1 file\(s\) twice .*\n  /d/a.png: label 'tumor' and 'normal'"):
        sp.dedupe([a, b, a.with_(label="normal")], "m")
    with pytest.raises(UserError, match=r"/d/a.png: split 'train' and 'test'"):
        sp.dedupe([a.with_(split="train"), a.with_(split="test")], "m")
    assert sp.dedupe([a, a.with_(label="normal")], "pool", strict=False)[0] == [a]  # pool labels are ignored


def test_identical_images_across_splits_or_labels_are_refused() -> None:
    digests = {"/d/a.png": "x", "/d/copy_of_a.png": "x", "/d/b.png": "y"}
    train = [Record("/d/a.png", "tumor", split="train"), Record("/d/b.png", "normal", split="train")]
    sp.check_duplicate_content({"train": train, "valid": [], "test": []}, digests, "t")
    leak = {"train": train, "valid": [], "test": [Record("/d/copy_of_a.png", "tumor", split="test")]}
    with pytest.raises(UserError, match=r"target 't': 1 image\(s\) would be in two splits .*\n  "
                                        r"/d/a.png \(train\) = /d/copy_of_a.png \(test\)"):
        sp.check_duplicate_content(leak, digests, "t")
    relabeled = {"train": train + [Record("/d/copy_of_a.png", "normal", split="train")], "valid": [], "test": []}
    with pytest.raises(UserError, match=r"(?s)two labels .*/d/a.png \(label 'tumor'\) = /d/copy_of_a.png \(label 'normal'\)"):
        sp.check_duplicate_content(relabeled, digests, "t")
    pool = [Record("/p/copy.png", source="other")]
    with pytest.raises(UserError, match=r"(?s)1 pool file\(s\) are copies .*/p/copy.png \(pool source 'other'\) = "
                                        r"/d/copy_of_a.png \(test split\)"):
        sp.check_pool_content(pool, leak["test"], {**digests, "/p/copy.png": "x"}, "t")


def test_a_target_needs_two_classes() -> None:
    sp.check_two_classes(["a", "b"], "t")
    with pytest.raises(UserError, match="target 't' has only the class 'a'; a classifier needs at least two"):
        sp.check_two_classes(["a"], "t")
