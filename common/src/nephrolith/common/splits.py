"""Group-aware train/val/test splits and federated site partitions (IID, Dirichlet skew)."""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from nephrolith.common.errors import ConfigError, DataError
from nephrolith.common.manifest import SPLIT_NAMES, Record

logger = logging.getLogger(__name__)

# Stratum of a group whose records carry no label.
_UNLABELLED = -1
# Order in which splits receive a group of a class that has fewer groups than splits.
_SEED_PRIORITY = ("train", "test", "val")


def group_records(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Return {group id: records} sorted by group id, so results do not depend on input order."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.group].append(record)
    return {key: groups[key] for key in sorted(groups)}


def group_label(members: Sequence[Record]) -> int:
    """Return 1 when any record of a group is stone, 0 when all labelled ones are not, else -1."""
    labels = [r.binary_label for r in members if r.binary_label is not None]
    if not labels:
        return _UNLABELLED
    return int(max(labels))


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    values = np.asarray(fractions, dtype=float)
    if values.shape != (len(SPLIT_NAMES),) or (values < 0).any() or abs(values.sum() - 1.0) > 1e-6:
        raise ConfigError(
            f"split fractions: expected {len(SPLIT_NAMES)} non-negative numbers for "
            f"{'/'.join(SPLIT_NAMES)} summing to 1, got {tuple(fractions)}"
        )
    return values


def _fill_by_deficit(
    sizes: Sequence[int],
    order: Sequence[int],
    targets: np.ndarray,
    counts: np.ndarray,
    bins: np.ndarray,
) -> None:
    """Give each unit (in `order`) to the bin furthest below its target; updates counts, bins."""
    for unit in order:
        deficit = targets - counts
        deficit[targets <= 0] = -np.inf
        chosen = int(np.argmax(deficit))
        bins[unit] = chosen
        counts[chosen] += sizes[unit]


def _assign_stratum(
    sizes: list[int], fractions: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Assign the groups of one stratum to splits, giving each used split a group when possible.

    Groups are taken in random order. First each split with a positive fraction
    gets one group that fits its target, in the order train, test, val while
    groups last, because a test set matters more than a validation set. The
    rest go to the split furthest below its target, counted in records.
    """
    n = len(sizes)
    order = list(rng.permutation(n))
    targets = fractions * float(sum(sizes))
    counts = np.zeros(len(fractions))
    bins = np.full(n, -1)
    priority = [SPLIT_NAMES.index(name) for name in _SEED_PRIORITY]
    seeded = [k for k in priority if fractions[k] > 0][:n]

    # Smallest target first, so the small splits pick among all groups that fit them.
    for k in sorted(seeded, key=lambda k: targets[k]):
        fitting = [u for u in order if sizes[u] <= max(targets[k], 1.0)]
        pick = fitting[0] if fitting else min(order, key=lambda u: sizes[u])
        order.remove(pick)
        bins[pick] = k
        counts[k] += sizes[pick]
    _fill_by_deficit(sizes, order, targets, counts, bins)
    return bins


def assign_splits(
    records: Sequence[Record],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify: bool = True,
    overwrite: bool = False,
) -> list[Record]:
    """Assign train/val/test by group (patient or scan group), never by image.

    With `stratify`, stone groups (any stone record) and no-stone groups are
    split separately, so every split receives both classes whenever each class
    has at least one group per split. Groups that already carry a split (from a
    manifest) keep it unless `overwrite` is set; the others are split by
    `fractions` of their record counts.

    Args:
        records: records to split; their `group` decides what stays together.
        fractions: train, val and test fractions summing to 1.
        seed: seed of the random group order; equal seeds give equal splits.
        stratify: split stone and no-stone groups separately.
        overwrite: reassign groups that already have a split.

    Returns:
        New records (same order) with `split` set.

    Raises:
        ConfigError: on invalid fractions.
        DataError: when one group already carries two different splits.
    """
    values = _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    groups = group_records(records)

    # Keep existing splits per group, and refuse groups that already straddle two splits.
    chosen: dict[str, str] = {}
    for key, members in groups.items():
        existing = {r.split for r in members if r.split}
        if len(existing) > 1 and not overwrite:
            raise DataError(
                f"group {key!r} has records in splits {sorted(existing)}, which leaks one "
                "patient/scan into two splits; fix the split column or pass overwrite=True"
            )
        if existing and not overwrite:
            chosen[key] = existing.pop()

    # Split the remaining groups, per stratum.
    strata: dict[int, list[str]] = defaultdict(list)
    for key, members in groups.items():
        if key not in chosen:
            strata[group_label(members) if stratify else 0].append(key)
    for stratum in sorted(strata):
        keys = strata[stratum]
        bins = _assign_stratum([len(groups[k]) for k in keys], values, rng)
        chosen.update({k: SPLIT_NAMES[b] for k, b in zip(keys, bins, strict=True)})

    result = [dataclasses.replace(r, split=chosen[r.group]) for r in records]
    _warn_missing_classes(result)
    return result


def _warn_missing_classes(records: Sequence[Record]) -> None:
    for split in SPLIT_NAMES:
        labels = {
            r.binary_label for r in records if r.split == split and r.binary_label is not None
        }
        if labels and labels != {0, 1}:
            missing = "stone" if 1 not in labels else "no_stone"
            logger.warning(
                "split %s has no %s group; metrics such as ROC-AUC are undefined on it. "
                "Add groups of that class or change the fractions",
                split,
                missing,
            )


def split_counts(records: Sequence[Record]) -> dict[str, dict[str, int]]:
    """Return {split: {"records", "groups", "stone", "no_stone"}} for a log line or a report."""
    table: dict[str, dict[str, int]] = {}
    for split in sorted({r.split or "" for r in records}):
        members = [r for r in records if (r.split or "") == split]
        table[split or "unassigned"] = {
            "records": len(members),
            "groups": len({r.group for r in members}),
            "stone": sum(r.binary_label == 1 for r in members),
            "no_stone": sum(r.binary_label == 0 for r in members),
        }
    return table


# -- federated partitions -----------------------------------------------------------------------


def _partition_units(records: Sequence[Record], by: str) -> dict[str, list[Record]]:
    if by == "group":
        return group_records(records)
    if by == "record":
        logger.warning("partitioning by record splits scan groups across sites")
        return {str(i): [r] for i, r in enumerate(records)}
    raise ConfigError(f"partition by: expected 'group' or 'record', got {by!r}")


def _site_names(n_sites: int, site_names: Sequence[str] | None) -> list[str]:
    if n_sites < 1:
        raise ConfigError(f"n_sites: expected >= 1, got {n_sites}")
    if site_names is None:
        return [f"site{k + 1}" for k in range(n_sites)]
    if len(site_names) != n_sites or len(set(site_names)) != n_sites:
        raise ConfigError(f"site_names: expected {n_sites} distinct names, got {list(site_names)}")
    return list(site_names)


def _fill_empty_sites(bins: np.ndarray, sizes: Sequence[int], n_sites: int) -> None:
    """Move units until every site has one: the smallest unit of the site holding most units."""
    for site in range(n_sites):
        if (bins == site).any():
            continue
        per_site = np.bincount(bins, minlength=n_sites)
        donor = int(np.argmax(per_site))
        movable = [u for u in np.flatnonzero(bins == donor)]
        unit = min(movable, key=lambda u: sizes[u])
        bins[unit] = site


def _partition(
    records: Sequence[Record],
    n_sites: int,
    seed: int,
    by: str,
    site_names: Sequence[str] | None,
    proportions,
) -> list[list[Record]]:
    """Share each class's units over sites by `proportions(rng)` of its record count."""
    names = _site_names(n_sites, site_names)
    units = _partition_units(records, by)
    if len(units) < n_sites:
        raise DataError(f"cannot give {n_sites} sites a group each: only {len(units)} groups")
    rng = np.random.default_rng(seed)
    keys = list(units)
    sizes = [len(units[k]) for k in keys]
    bins = np.full(len(keys), -1)

    # Per class: draw the site shares, then give units (random order) to the site furthest below.
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, key in enumerate(keys):
        by_class[group_label(units[key])].append(index)
    for label in sorted(by_class):
        members = by_class[label]
        shares = proportions(rng)
        targets = shares * float(sum(sizes[i] for i in members))
        order = [members[i] for i in rng.permutation(len(members))]
        local = np.full(len(keys), -1)
        _fill_by_deficit(sizes, order, targets, np.zeros(n_sites), local)
        bins[members] = local[members]

    _fill_empty_sites(bins, sizes, n_sites)
    sites: list[list[Record]] = [[] for _ in range(n_sites)]
    for index, key in enumerate(keys):
        site = int(bins[index])
        sites[site].extend(dataclasses.replace(r, site=names[site]) for r in units[key])
    for name, members in zip(names, sites, strict=True):
        logger.info(
            "%s: %d records, %d stone",
            name,
            len(members),
            sum(r.binary_label == 1 for r in members),
        )
    return sites


def dirichlet_partition(
    records: Sequence[Record],
    n_sites: int,
    alpha: float,
    seed: int = 0,
    by: str = "group",
    site_names: Sequence[str] | None = None,
) -> list[list[Record]]:
    """Partition records over simulated sites with Dirichlet label skew.

    For each class, site shares are drawn from Dirichlet(alpha, ..., alpha) and
    that class's groups are handed out so each site's record count follows its
    share, the usual way to simulate label skew between sites. Small alpha (0.1) gives
    sites dominated by one class; large alpha (100) gives nearly equal mixes.
    A group never spans two sites, and every site gets at least one group.

    Args:
        records: records to share out.
        n_sites: number of sites.
        alpha: Dirichlet concentration, > 0.
        seed: seed of the draws and the group order.
        by: "group" (default) or "record" (splits scan groups, leaks between sites).
        site_names: names set as `record.site`; default "site1", "site2", ...

    Returns:
        One list of records per site, with `site` set.

    Raises:
        ConfigError: on alpha <= 0, n_sites < 1 or an unknown `by`.
        DataError: when there are fewer groups than sites.
    """
    if not alpha > 0:
        raise ConfigError(f"alpha: expected a Dirichlet concentration > 0, got {alpha}")
    return _partition(
        records,
        n_sites,
        seed,
        by,
        site_names,
        lambda rng: rng.dirichlet(np.full(n_sites, float(alpha))),
    )


def iid_partition(
    records: Sequence[Record],
    n_sites: int,
    seed: int = 0,
    by: str = "group",
    site_names: Sequence[str] | None = None,
) -> list[list[Record]]:
    """Partition records over sites with equal shares of each class (no label skew).

    Arguments and errors as in `dirichlet_partition`.
    """
    return _partition(
        records, n_sites, seed, by, site_names, lambda rng: np.full(n_sites, 1.0 / n_sites)
    )


def group_folds(records: Sequence[Record], n_folds: int, seed: int = 0) -> list[int]:
    """Return a cross-validation fold index per record, keeping every group in one fold.

    Stone and no-stone groups are dealt out separately: in a seeded random order,
    each group goes to the fold that has the fewest records of its class so far,
    so folds get similar sizes and both classes wherever there are enough groups.

    Args:
        records: records with `group` set.
        n_folds: number of folds, at least 2.
        seed: seed of the group order.

    Raises:
        DataError: when there are fewer groups than folds.
    """
    if n_folds < 2:
        raise DataError(f"cross-validation needs at least 2 folds, got {n_folds}")
    groups = group_records(records)
    if len(groups) < n_folds:
        raise DataError(
            f"cross-validation: {len(groups)} groups cannot fill {n_folds} folds; "
            "use fewer folds"
        )
    rng = np.random.default_rng(seed)
    fold_of_group: dict[str, int] = {}
    for label in (1, 0):
        names = sorted(g for g, members in groups.items() if group_label(members) == label)
        load = np.zeros(n_folds, dtype=np.int64)
        for name in rng.permutation(names):
            # Ties between equally loaded folds are broken at random with the seed.
            candidates = np.flatnonzero(load == load.min())
            fold = int(rng.choice(candidates))
            fold_of_group[str(name)] = fold
            load[fold] += len(groups[str(name)])
    return [fold_of_group[r.group] for r in records]
