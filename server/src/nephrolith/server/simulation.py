"""Hospitals made from one data folder, and the ServerApp/ClientApp in Flower's simulation."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from nephrolith.common.errors import ConfigError, DataError
from nephrolith.server.settings import RunSettings

logger = logging.getLogger(__name__)

PARTITIONS = ("site", "iid", "dirichlet")


def prepare_sites(
    source: Path,
    out_dir: Path,
    n_sites: int,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    limit: int | None = None,
) -> tuple[list[Path], Path | None]:
    """Write one manifest folder per hospital (paths point into `source`) and a server test folder.

    Records without a split get a group-wise train/val/test split first. The test
    split is held out for server-side evaluation. Train and val records are shared
    out by the manifest's site column ("site"), evenly ("iid"), or with Dirichlet
    label skew over groups ("dirichlet", concentration `alpha`). A group never
    spans two hospitals.

    Args:
        source: a data folder that `data.discover` reads.
        out_dir: receives sites/<name>/manifest.csv and server-test/manifest.csv.
        n_sites: number of hospitals (ignored for "site", which uses the column).
        partition: "site", "iid" or "dirichlet".
        alpha: Dirichlet concentration for "dirichlet".
        seed: seed of the split and the partition.
        limit: keep at most about this many records per hospital (and in the test
            folder), sampled per split and class; None keeps all.

    Returns:
        (hospital folders, server test folder or None when there is no test split).

    Raises:
        ConfigError: on an unknown partition or a missing site column.
        DataError: when there are fewer groups than hospitals.
    """
    from nephrolith.common import data

    if partition not in PARTITIONS:
        raise ConfigError(f"--partition: expected one of {PARTITIONS}, got {partition!r}")
    records = data.discover(Path(source))
    if any(r.split is None for r in records):
        records = data.assign_splits(records, seed=seed)
    test = [r for r in records if r.split == "test"]
    pool = [r for r in records if r.split != "test"]

    if partition == "site":
        by_site: dict[str, list] = defaultdict(list)
        for record in pool:
            if not record.site:
                raise ConfigError(f"{source}: --partition site needs a site value on every record")
            by_site[record.site].append(record)
        parts = [by_site[name] for name in sorted(by_site)]
    elif partition == "iid":
        parts = data.iid_partition(pool, n_sites, seed=seed)
    else:
        parts = data.dirichlet_partition(pool, n_sites, alpha, seed=seed)

    if limit is not None:
        parts = [subsample(part, limit, seed) for part in parts]
        test = subsample(test, limit, seed)
    folders = []
    for index, part in enumerate(parts, start=1):
        name = part[0].site if part and part[0].site else f"hospital{index}"
        folder = Path(out_dir) / "sites" / name
        data.write_manifest([replace(r, site=name) for r in part], folder / "manifest.csv")
        positives = sum(1 for r in part if r.binary_label == 1)
        logger.info("%s: %d records (%d stone)", name, len(part), positives)
        folders.append(folder)
    server_test = None
    if test:
        server_test = Path(out_dir) / "server-test"
        data.write_manifest(test, server_test / "manifest.csv")
    if not folders:
        raise DataError(
            f"{source}: no records left for the hospitals after holding out the test split"
        )
    return folders, server_test


def subsample(records: list, limit: int, seed: int) -> list:
    """Keep about `limit` records: the same fraction of every (split, class) stratum, at least 1."""
    if len(records) <= limit:
        return list(records)
    rng = np.random.default_rng(seed)
    strata: dict[tuple, list] = defaultdict(list)
    for record in records:
        strata[(record.split, record.binary_label)].append(record)
    kept = []
    for key in sorted(strata, key=str):
        members = strata[key]
        count = max(1, round(len(members) * limit / len(records)))
        kept += [members[i] for i in sorted(rng.choice(len(members), count, replace=False))]
    return kept


def simulate(settings: RunSettings, site_dirs: list[Path], cpus: int | None = None) -> RunSettings:
    """Run the federation in Flower's simulation runtime (Ray) with one virtual node per folder.

    The ServerApp and ClientApp are the ones a deployment runs; only the transport
    differs. Each Ray actor trains with one TensorFlow thread, and at most `cpus`
    actors run at once.

    Returns:
        The settings as run (with site_dirs filled in); the outputs are in settings.run_dir.
    """
    # Ray workers inherit the driver's environment; TF reads it at import.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from nephrolith.client.flower_app import make_client_app
    from nephrolith.server.app import make_server_app

    settings = replace(settings, site_dirs=tuple(str(Path(p).resolve()) for p in site_dirs))
    settings.save()
    cpus = cpus or max(1, min(len(site_dirs), len(os.sched_getaffinity(0))))
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False},
    }
    run_simulation(
        server_app=make_server_app(settings),
        client_app=make_client_app(settings.site_dirs),
        num_supernodes=len(site_dirs),
        backend_config=backend_config,  # type: ignore[arg-type]
    )
    return settings
