"""Tests of group-aware splits and federated partitions on hand-made and real records."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from nephrolith.common import data
from nephrolith.common.errors import ConfigError, DataError
from nephrolith.common.manifest import Record


def make_records(n_groups: int, per_group: int, label: str, prefix: str) -> list[Record]:
    """Build `n_groups` groups of `per_group` records each, all with one source label."""
    binary = data.binary_label_of(label)
    return [
        Record(Path(f"/data/{prefix}{g}/{i}.png"), label, binary, None, f"{prefix}{g}")
        for g in range(n_groups)
        for i in range(per_group)
    ]


def sides(records: list[Record]) -> dict[str, set[str]]:
    """Return {group: splits its records are in}."""
    found: dict[str, set[str]] = {}
    for r in records:
        found.setdefault(r.group, set()).add(r.split)
    return found


@pytest.fixture(scope="module")
def islam_records(islam_subset: Path) -> list[Record]:
    return data.discover(islam_subset)


@pytest.fixture(scope="module")
def combined_records(islam_subset: Path, stone_boxes: Path) -> list[Record]:
    return data.discover(islam_subset) + data.discover(stone_boxes)


# -- assign_splits ------------------------------------------------------------------------------


def test_splits_equal_groups_hit_targets_exactly() -> None:
    # 20 groups of 5 per class: targets are 14/3/3 groups per class (70/15/15 %).
    records = make_records(20, 5, "stone", "s") + make_records(20, 5, "normal", "n")

    result = data.assign_splits(records, seed=3)

    groups = Counter((r.split, r.binary_label) for r in result)
    for label in (0, 1):
        assert groups[("train", label)] == 14 * 5
        assert groups[("val", label)] == 3 * 5
        assert groups[("test", label)] == 3 * 5


def test_splits_keep_input_order_and_fields() -> None:
    records = make_records(4, 2, "stone", "s") + make_records(4, 2, "cyst", "c")

    result = data.assign_splits(records, seed=0)

    assert [r.path for r in result] == [r.path for r in records]
    assert [r.label for r in result] == [r.label for r in records]
    assert all(r.split in data.SPLIT_NAMES for r in result)


def test_splits_no_group_leak(islam_records: list[Record]) -> None:
    result = data.assign_splits(islam_records, seed=0)

    train = {r.group for r in result if r.split == "train"}
    val = {r.group for r in result if r.split == "val"}
    test = {r.group for r in result if r.split == "test"}
    assert train & val == set()
    assert train & test == set()
    assert val & test == set()
    assert len(train | val | test) == 52


def test_splits_both_classes_everywhere(islam_records: list[Record]) -> None:
    for seed in range(3):
        result = data.assign_splits(islam_records, seed=seed)
        for split in data.SPLIT_NAMES:
            labels = {r.binary_label for r in result if r.split == split}
            assert labels == {0, 1}, (seed, split)


def test_splits_fractions_near_target(islam_records: list[Record]) -> None:
    result = data.assign_splits(islam_records, seed=0)

    counts = Counter(r.split for r in result)
    assert 0.55 <= counts["train"] / len(result) <= 0.85
    assert 0.05 <= counts["val"] / len(result) <= 0.3
    assert 0.05 <= counts["test"] / len(result) <= 0.3


def test_splits_deterministic_per_seed(islam_records: list[Record]) -> None:
    first = [r.split for r in data.assign_splits(islam_records, seed=7)]
    again = [r.split for r in data.assign_splits(islam_records, seed=7)]
    other = [r.split for r in data.assign_splits(islam_records, seed=8)]

    assert first == again
    assert first != other


def test_splits_ignore_input_order(islam_records: list[Record]) -> None:
    forward = data.assign_splits(islam_records, seed=2)
    backward = data.assign_splits(list(reversed(islam_records)), seed=2)

    assert {r.path: r.split for r in forward} == {r.path: r.split for r in backward}


def test_splits_linked_groups_same_side(combined_records: list[Record]) -> None:
    # README of the stone-boxes folder: stone 1331-1345 continue the scan of subset group
    # stone-g14 (e.g. "Stone- (205).jpg"); 1346 and 1374-1377 that of stone-g01 ("Stone- (1).jpg").
    links = {
        "Stone- (205).jpg": [*range(1331, 1346)],
        "Stone- (1).jpg": [1346, 1374, 1375, 1376, 1377],
    }

    for seed in range(4):
        result = data.assign_splits(combined_records, seed=seed)
        split_of = {r.path.name: r.split for r in result}
        number_split = {
            int(r.path.name.split("---")[1].split("-")[0]): r.split
            for r in result
            if r.path.name.startswith("STONE---")
        }
        for subset_name, numbers in links.items():
            for number in numbers:
                assert number_split[number] == split_of[subset_name], (seed, number)
        assert set().union(*(s for s in sides(result).values() if len(s) > 1)) == set()


def test_splits_keep_existing_manifest_split() -> None:
    records = make_records(6, 2, "stone", "s") + make_records(6, 2, "normal", "n")
    records = [
        r if r.group != "s0" else Record(r.path, r.label, r.binary_label, None, r.group, "test")
        for r in records
    ]

    kept = data.assign_splits(records, seed=0)
    rewritten = [data.assign_splits(records, seed=s, overwrite=True) for s in range(6)]

    assert {r.split for r in kept if r.group == "s0"} == {"test"}
    assert any({r.split for r in result if r.group == "s0"} != {"test"} for result in rewritten)


def test_splits_group_in_two_splits_raises() -> None:
    records = make_records(1, 2, "stone", "s")
    records = [
        Record(r.path, r.label, r.binary_label, None, r.group, split)
        for r, split in zip(records, ("train", "test"), strict=True)
    ]

    with pytest.raises(DataError, match=r"group 's0' has records in splits \['test', 'train'\]"):
        data.assign_splits(records)
    assert {r.split for r in data.assign_splits(records, overwrite=True)} in (
        {"train"},
        {"val"},
        {"test"},
    )


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1)])
def test_splits_invalid_fractions_raise(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError, match="split fractions"):
        data.assign_splits(make_records(3, 1, "stone", "s"), fractions=fractions)


def test_splits_warn_when_class_missing(caplog: pytest.LogCaptureFixture) -> None:
    # Two stone groups cannot cover three splits: train and test get one each, val none.
    records = make_records(2, 3, "stone", "s") + make_records(6, 3, "normal", "n")

    with caplog.at_level(logging.WARNING, logger="nephrolith.common.splits"):
        result = data.assign_splits(records, seed=0)

    missing = [
        s for s in data.SPLIT_NAMES if 1 not in {r.binary_label for r in result if r.split == s}
    ]
    assert missing == ["val"]
    assert "split val has no stone group" in caplog.text


def test_splits_unstratified_by_group(islam_records: list[Record]) -> None:
    result = data.assign_splits(islam_records, seed=0, stratify=False)

    assert all(len(s) == 1 for s in sides(result).values())


# -- partitions ---------------------------------------------------------------------------------


def check_partition(records: list[Record], sites: list[list[Record]], n_sites: int) -> None:
    """Assert the invariants every partition must meet."""
    assert len(sites) == n_sites
    assert all(len(site) > 0 for site in sites)
    assigned = [r.path for site in sites for r in site]
    assert Counter(assigned) == Counter(r.path for r in records)
    site_of_group: dict[str, set[str]] = {}
    for site in sites:
        for r in site:
            site_of_group.setdefault(r.group, set()).add(r.site)
    assert all(len(names) == 1 for names in site_of_group.values())
    for index, site in enumerate(sites):
        assert {r.site for r in site} == {f"site{index + 1}"}


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_invariants(islam_records: list[Record], alpha: float) -> None:
    for seed in range(3):
        sites = data.dirichlet_partition(islam_records, 4, alpha, seed=seed)
        check_partition(islam_records, sites, 4)


def test_dirichlet_small_alpha_skews_labels(islam_records: list[Record]) -> None:
    def spread(alpha: float, seed: int) -> float:
        sites = data.dirichlet_partition(islam_records, 3, alpha, seed=seed)
        fractions = [np.mean([r.binary_label for r in site]) for site in sites]
        return max(fractions) - min(fractions)

    skewed = [spread(0.1, seed) for seed in range(6)]
    even = [spread(1000.0, seed) for seed in range(6)]

    assert np.mean(skewed) > 0.6
    assert max(even) < 0.3


def test_dirichlet_deterministic_per_seed(islam_records: list[Record]) -> None:
    def sites_of(seed: int) -> list[list[Path]]:
        return [
            [r.path for r in site] for site in data.dirichlet_partition(islam_records, 3, 0.5, seed)
        ]

    assert sites_of(1) == sites_of(1)
    assert sites_of(1) != sites_of(2)


def test_iid_partition_equal_groups_exact() -> None:
    # 6 equal groups per class over 3 sites: each site gets 2 stone and 2 normal groups.
    records = make_records(6, 4, "stone", "s") + make_records(6, 4, "normal", "n")

    sites = data.iid_partition(records, 3, seed=5)

    check_partition(records, sites, 3)
    for site in sites:
        assert Counter(r.binary_label for r in site) == {1: 8, 0: 8}


def test_partition_every_site_gets_a_group() -> None:
    # With 4 groups and 4 sites, every site must hold exactly one group whatever the draw.
    records = make_records(2, 3, "stone", "s") + make_records(2, 3, "normal", "n")

    for seed in range(5):
        sites = data.dirichlet_partition(records, 4, 0.01, seed=seed)
        assert sorted(len({r.group for r in site}) for site in sites) == [1, 1, 1, 1]


def test_partition_errors() -> None:
    records = make_records(2, 1, "stone", "s")

    with pytest.raises(DataError, match="only 2 groups"):
        data.dirichlet_partition(records, 3, 1.0)
    with pytest.raises(ConfigError, match="alpha"):
        data.dirichlet_partition(records, 2, 0.0)
    with pytest.raises(ConfigError, match="'group' or 'record'"):
        data.iid_partition(records, 2, by="patient")
    with pytest.raises(ConfigError, match="site_names"):
        data.iid_partition(records, 2, site_names=["a", "a"])


def test_partition_custom_site_names() -> None:
    records = make_records(4, 2, "stone", "s")

    sites = data.iid_partition(records, 2, site_names=["hospital-a", "hospital-b"])

    assert [{r.site for r in site} for site in sites] == [{"hospital-a"}, {"hospital-b"}]


def test_group_folds_keep_groups_whole(islam_subset):
    from nephrolith.common import data

    records = data.discover(islam_subset)

    folds = data.group_folds(records, 5, seed=0)

    fold_of_group: dict[str, set[int]] = {}
    for record, fold in zip(records, folds, strict=True):
        fold_of_group.setdefault(record.group, set()).add(fold)
    assert all(len(f) == 1 for f in fold_of_group.values())
    for fold in range(5):
        labels = {r.binary_label for r, f in zip(records, folds, strict=True) if f == fold}
        assert labels == {0, 1}, f"fold {fold} lacks a class"
    assert folds == data.group_folds(records, 5, seed=0)
    assert folds != data.group_folds(records, 5, seed=1)


def test_group_folds_rejects_too_many_folds(islam_subset):
    from nephrolith.common import data
    from nephrolith.common.errors import DataError

    records = [r for r in data.discover(islam_subset) if r.group in {"stone-g01", "cyst-g02"}]

    with pytest.raises(DataError, match="2 groups cannot fill 3 folds"):
        data.group_folds(records, 3)
