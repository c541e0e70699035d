"""Splits, label budgets and the guards that keep an evaluation honest (pure functions)."""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histodiffusion.config import budget_name
from histodiffusion.data.sources import Record
from histodiffusion.errors import UserError

SPLITS = ("train", "valid", "test")


def by_label(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Group records by label, labels sorted."""
    out: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        out[r.label].append(r)  # type: ignore[index]
    return dict(sorted(out.items()))


def _rng(seed: int, *salt: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and a text salt, so each use draws an independent stream."""
    key = [seed] + [int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little") for s in salt]
    return np.random.default_rng(key)


def split_own(records: Sequence[Record], valid_fraction: float = 0.1, seed: int = 0) -> dict[str, list[Record]]:
    """Use the dataset's own train/valid/test split; a missing valid split is carved out of train."""
    out = {s: [r for r in records if r.split == s] for s in SPLITS}
    if out["train"] and out["test"] and not out["valid"]:
        fractions = (1 - valid_fraction, valid_fraction, 0.0)
        carve = split_grouped if all(r.group for r in out["train"]) else split_stratified
        parts = carve(out["train"], fractions, seed)
        out["train"], out["valid"] = parts["train"], parts["valid"]
    missing = [s for s in SPLITS if not out[s]]
    if missing:
        raise UserError(f"the target has no '{missing[0]}' split of its own; set data.target.split_by "
                        "to 'group' or 'stratified'")
    return out


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into counts close to ``fractions`` (largest remainder), summing to n."""
    raw = [n * f for f in fractions]
    counts = [math.floor(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_grouped(records: Sequence[Record], fractions: Sequence[float], seed: int) -> dict[str, list[Record]]:
    """Split by case id: each group goes to one split; groups stratified by their majority label."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.group is None:
            raise UserError(f"{r.path} has no group (case id); use data.target.split_by: stratified")
        groups[r.group].append(r)
    by_major: dict[str, list[str]] = defaultdict(list)
    for g, members in sorted(groups.items()):
        major = Counter(m.label for m in members).most_common(1)[0][0]
        by_major[major].append(g)
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for label, names in sorted(by_major.items()):
        order = _rng(seed, "group-split", label).permutation(len(names))
        counts = _allocate(len(names), fractions)
        start = 0
        for split, c in zip(SPLITS, counts, strict=False):
            for i in order[start : start + c]:
                out[split] += groups[names[i]]
            start += c
    return out


def split_stratified(records: Sequence[Record], fractions: Sequence[float], seed: int) -> dict[str, list[Record]]:
    """Split file by file, stratified by label (no case ids: tiles of one slide may share splits)."""
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for label, members in by_label(records).items():
        order = _rng(seed, "file-split", label).permutation(len(members))
        start = 0
        for split, c in zip(SPLITS, _allocate(len(members), fractions), strict=False):
            out[split] += [members[i] for i in order[start : start + c]]
            start += c
    return out


def split_target(records: Sequence[Record], mode: str, fractions: Sequence[float],
                 seed: int, valid_fraction: float = 0.1) -> tuple[dict[str, list[Record]], str]:
    """Train/valid/test split of the target by ``mode`` (auto/own/group/stratified); returns the mode used."""
    if mode == "auto":
        mode = "own" if all(r.split for r in records) and {r.split for r in records} >= {"train", "test"} else \
            "group" if all(r.group for r in records) else "stratified"
    if mode == "own":
        splits = split_own(records, valid_fraction, seed)
    elif mode == "group":
        splits = split_grouped(records, fractions, seed)
    else:
        splits = split_stratified(records, fractions, seed)
    return {s: [r.with_(split=s) for r in rs] for s, rs in splits.items()}, mode


def labeled_subset(train: Sequence[Record], budget: int | float, seed: int) -> list[Record]:
    """Stratified, seeded label budget: a fraction of each class, or a count per class.

    One permutation per class is drawn from ``seed``, and every budget takes a prefix of it, so
    a smaller budget's subset is contained in a larger one's.
    """
    out = []
    for label, members in by_label(train).items():
        members = sorted(members, key=lambda r: r.path)
        order = _rng(seed, "labeled", label).permutation(len(members))
        if isinstance(budget, int):
            n = min(budget, len(members))
        else:
            n = int(round(budget * len(members)))
        out += [members[i] for i in order[:n]]
    return out


def cap_per_class(records: Sequence[Record], cap: int, seed: int, salt: str) -> list[Record]:
    """At most ``cap`` records per label (seeded)."""
    out = []
    for label, members in by_label(records).items():
        order = _rng(seed, salt, label).permutation(len(members))
        out += [members[i] for i in sorted(order[:cap])]
    return out


def weighted_sample(records: Sequence[Record], n: int, seed: int) -> list[Record]:
    """``n`` records without replacement, each drawn with probability proportional to its weight."""
    if n >= len(records):
        return list(records)
    w = np.array([r.weight for r in records], dtype=np.float64)
    idx = _rng(seed, "pool-sample").choice(len(records), size=n, replace=False, p=w / w.sum())
    return [records[i] for i in sorted(idx)]


# ------------------------------------------------------------------------------------ guards
def check_group_leakage(splits: dict[str, Sequence[Record]]) -> None:
    """Refuse a case id that appears in two splits (tiles of one patient in train and test)."""
    seen: dict[str, str] = {}
    for split, records in splits.items():
        for r in records:
            if r.group is None:
                continue
            other = seen.setdefault(r.group, split)
            if other != split:
                raise UserError(
                    f"group leakage: case '{r.group}' is in both the {other} and the {split} split "
                    f"(e.g. {r.path}). Tiles of one case must stay in one split: use "
                    "data.target.split_by: group, or fix the split column of the manifest."
                )


def check_pool_disjoint(pool: Sequence[Record], target: Sequence[Record], target_name: str) -> None:
    """Refuse a pre-training pool that contains any file of the target dataset."""
    target_paths = {str(Path(r.path).resolve()) for r in target}
    overlap = [r for r in pool if str(Path(r.path).resolve()) in target_paths]
    if overlap:
        shown = "\n  ".join(f"{r.path} (pool source '{r.source}')" for r in overlap[:5])
        raise UserError(
            f"{len(overlap)} file(s) of the target dataset '{target_name}' are in the pre-training pool, "
            f"which must exclude the target:\n  {shown}\nRemove that source from data.pool (or "
            "restrict it with 'splits:')."
        )


def check_pool_excludes(pool: Sequence[Record], held_out: Sequence[Record], target_name: str) -> None:
    """Refuse a pre-training pool holding any valid or test file of the target (by path): model
    selection and the test score must come from tiles no stage has trained on."""
    held = {str(Path(r.path).resolve()): r.split for r in held_out}
    inside = [r for r in pool if str(Path(r.path).resolve()) in held]
    if inside:
        shown = "\n  ".join(f"{r.path} ({held[str(Path(r.path).resolve())]} split, pool source '{r.source}')"
                            for r in inside[:5])
        raise UserError(
            f"{len(inside)} valid or test file(s) of the target '{target_name}' would enter the pre-training pool:\n"
            f"  {shown}\nValid and test tiles must never be trained on. Restrict the pool source with 'splits:' "
            "or remove it from data.pool."
        )


def check_classes_present(labeled: Sequence[Record], train: Sequence[Record], budget: int | float) -> None:
    """Refuse a label budget that leaves a class with no labeled image."""
    have = Counter(r.label for r in labeled)
    for label, members in by_label(train).items():
        if have[label] == 0:
            raise UserError(
                f"class '{label}' has no labeled images at budget {budget} ({budget_name(budget)}): the "
                f"train split holds {len(members)} image(s) of it. Raise the budget in "
                "data.target.budgets, give a count per class (e.g. 5), or drop the class with "
                "data.target.classes."
            )


def count_table(parts: dict[str, Sequence[Record]], classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """Counts per part and class: {part: {class: n, 'total': n}}."""
    table = {}
    for part, records in parts.items():
        c = Counter(r.label for r in records)
        row = {label: c.get(label, 0) for label in classes}
        row["total"] = len(records)
        table[part] = row
    return table


def _shown(lines: Sequence[str], n: int = 5) -> str:
    return "\n  ".join(lines[:n]) + (f"\n  ... and {len(lines) - n} more" if len(lines) > n else "")


def dedupe(records: Sequence[Record], source: str, strict: bool = True) -> tuple[list[Record], list[str]]:
    """Drop rows that list a file again (their paths are returned, for a warning); ``strict``
    (the target) refuses a file listed twice with another label, case id or split."""
    first: dict[str, Record] = {}
    repeated, conflicts = [], []
    for r in records:
        if r.path not in first:
            first[r.path] = r
            continue
        other = first[r.path]
        diff = [f"{name} {getattr(other, attr)!r} and {getattr(r, attr)!r}"
                for name, attr in (("label", "label"), ("case id", "group"), ("split", "split"))
                if getattr(other, attr) != getattr(r, attr)]
        if diff and strict:
            conflicts.append(f"{r.path}: " + ", ".join(diff))
        else:
            repeated.append(r.path)
    if conflicts:
        raise UserError(
            f"source '{source}' lists {len(conflicts)} file(s) twice with different values:\n  {_shown(conflicts)}\n"
            "One image has one label, case id and split: remove the wrong rows and rerun."
        )
    return list(first.values()), repeated


def check_duplicate_content(splits: dict[str, Sequence[Record]], digests: dict[str, str], target_name: str) -> None:
    """Refuse one image (identical bytes, under any file names) in two splits of the target or with two labels."""
    first: dict[str, Record] = {}
    leaks, labels = [], []
    for split in SPLITS:
        for r in splits.get(split, ()):
            d = digests.get(r.path)
            if d is None:
                continue
            other = first.setdefault(d, r)
            if other.path == r.path:
                continue
            if other.label != r.label:
                labels.append(f"{other.path} (label '{other.label}') = {r.path} (label '{r.label}')")
            elif other.split != r.split:
                leaks.append(f"{other.path} ({other.split}) = {r.path} ({r.split})")
    if labels:
        raise UserError(
            f"target '{target_name}': {len(labels)} image(s) appear with two labels (identical files):\n  "
            f"{_shown(labels)}\nGive each image one label: remove the wrong copy and rerun."
        )
    if leaks:
        raise UserError(
            f"target '{target_name}': {len(leaks)} image(s) would be in two splits (identical files), so the "
            f"test would score tiles seen in training:\n  {_shown(leaks)}\nRemove the duplicate files (or "
            "their manifest rows) and rerun."
        )


def check_pool_content(pool: Sequence[Record], held_out: Sequence[Record], digests: dict[str, str],
                       target_name: str) -> None:
    """Refuse a pre-training pool holding a copy (identical bytes, any name) of a valid or test image."""
    held = {digests[r.path]: r for r in held_out if r.path in digests}
    inside = [f"{r.path} (pool source '{r.source}') = {held[digests[r.path]].path} "
              f"({held[digests[r.path]].split} split)" for r in pool if digests.get(r.path) in held]
    if inside:
        raise UserError(
            f"{len(inside)} pool file(s) are copies of valid or test images of the target '{target_name}' "
            f"(identical files):\n  {_shown(inside)}\nValid and test tiles must never be trained on: remove "
            "the copies from the pool source (or restrict it with 'splits:' / 'labels:') and rerun."
        )


def check_two_classes(classes: Sequence[str], target_name: str) -> None:
    """Refuse a target with fewer than two classes: there is nothing to classify."""
    if len(classes) < 2:
        found = f"only the class '{classes[0]}'" if classes else "no class"
        raise UserError(
            f"target '{target_name}' has {found}; a classifier needs at least two. Add images of another "
            "class (a <label>/ folder or label value), or list two or more in data.target.classes."
        )
