"""`make demo`: synthetic hospitals, certificates, a real server and clients over TLS on 127.0.0.1.

Run as `python -m nephrolith.server.demo --out runs/demo`. It writes hospitals+1
synthetic CT sites, and the last one is held out for the server. It makes
certificates, starts `nephrolith-server start` with the console in this terminal
and one `join` process per hospital, and waits for the rounds. Finally it stops
the clients, evaluates the best global checkpoint on the held-out site and writes
a report.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from nephrolith.common.logs import setup_logging
from nephrolith.server.processes import free_port

logger = logging.getLogger(__name__)


def _held_out_manifest(site: Path, out: Path) -> Path:
    """Mark every record of the held-out site as test, in a manifest outside the site folder."""
    from nephrolith.common import data

    records = [replace(r, split="test") for r in data.discover(site)]
    return data.write_manifest(records, out / "heldout" / "manifest.csv")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def run_demo(
    out: Path, hospitals: int = 3, rounds: int = 3, image_size: int = 64, seed: int = 0
) -> int:
    """Run the whole demo and return the server's exit code."""
    from nephrolith.common import synth
    from nephrolith.server.certs import make_certs

    out = out.resolve()
    sites = synth.generate_federation(
        out / "data",
        n_sites=hospitals + 1,
        patients_per_site=8,
        seed=seed,
        slices_per_patient=(6, 8),
        image_size=128,
    )
    hospital_sites, held_out = sites[:hospitals], sites[hospitals]
    manifest = _held_out_manifest(held_out, out)
    make_certs(out / "certs", overwrite=True)
    address = f"127.0.0.1:{free_port()}"
    env = dict(
        os.environ,
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    (out / "logs").mkdir(parents=True, exist_ok=True)

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nephrolith.server.cli",
            "start",
            "--address",
            address,
            "--certs",
            str(out / "certs"),
            "--run-dir",
            str(out / "run"),
            "--rounds",
            str(rounds),
            "--min-clients",
            str(hospitals),
            "--tiny",
            "--image-size",
            str(image_size),
            "--batch-size",
            "16",
            "--lr",
            "1e-3",
            "--local-epochs",
            "1",
            "--server-data",
            str(manifest.parent),
            "--server-split",
            "test",
            "--seed",
            str(seed),
        ],
        env=env,
    )
    clients = []
    try:
        for site in hospital_sites:
            log = open(out / "logs" / f"{site.name}.log", "wb")  # noqa: SIM115 - closed below
            clients.append(
                (
                    log,
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "nephrolith.client.federation",
                            "--server",
                            address,
                            "--ca",
                            str(out / "certs" / "ca.pem"),
                            "--data",
                            str(site),
                            "--workdir",
                            str(out / "nodes" / site.name),
                            "--threads",
                            "1",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                    ),
                )
            )
        code = server.wait()
    finally:
        for log, process in clients:
            _stop(process)
            log.close()
        _stop(server)
    if code != 0:
        logger.error("the federation failed; see %s and %s", out / "run", out / "logs")
        return code

    from nephrolith.client.local import evaluate_checkpoint

    # "best" exists only after a round with a validation AUC from the hospitals, because
    # the held-out test site never selects a model. Without it, evaluate the last round's.
    checkpoint = out / "run" / "checkpoints" / "best"
    if not (checkpoint / "metadata.json").is_file():
        checkpoint = out / "run" / "checkpoints" / "last"
    result = evaluate_checkpoint(
        checkpoint,
        manifest.parent,
        out / "report",
        split="test",
        manifest=manifest,
        n_boot=200,
        seed=seed,
        title="nephrolith demo: federated model, held-out site",
    )
    image_metrics = result.get("image", {}).get("metrics", {})
    logger.info("held-out site, image level: AUC %s", image_metrics.get("roc_auc"))
    logger.info(
        "the demo trains a small model from random init for a few rounds on a few "
        "synthetic patients: it shows the federation at work (TLS, rounds, checkpoints, "
        "report), not a trained detector; expect an AUC near chance"
    )
    logger.info("round log:  %s", out / "run" / "rounds.jsonl")
    logger.info("checkpoint: %s", checkpoint)
    logger.info("report:     %s", out / "report" / "report.html")
    return 0


def main() -> None:
    """Parse the demo's arguments and run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--hospitals", type=int, default=3, help="number of hospitals")
    parser.add_argument("--rounds", type=int, default=3, help="server rounds")
    parser.add_argument("--image-size", type=int, default=64, help="model input side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, model and training")
    args = parser.parse_args()
    setup_logging()
    sys.exit(run_demo(args.out, args.hospitals, args.rounds, args.image_size, args.seed))


if __name__ == "__main__":
    main()
