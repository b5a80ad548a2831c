"""The federation as real processes on 127.0.0.1 over TLS, and the simulation compared with it.

One module-scoped run: certificates, `nephrolith-server start` and two
`nephrolith-client join` processes on small slices of the real Islam et al. data,
two FedAvg rounds of the tiny model. Before the hospitals join, a client with the
wrong CA and a plain-text client try to connect and must be refused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROUNDS = 2
SERVER_TIMEOUT_S = 1500


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # One TF thread per process and deterministic kernels, so the simulation can match.
    env.update(
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        TF_DETERMINISTIC_OPS="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    return env


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _write_configs(root: Path) -> list[str]:
    """Write a deterministic tiny setup (no dropout, no augmentation) as JSON config files."""
    from dataclasses import replace

    from nephrolith.common.config import PreprocessConfig, TrainConfig, to_dict
    from nephrolith.common.model import tiny_model_config

    files = {
        "model.json": to_dict(replace(tiny_model_config(32), dropout=0.0)),
        "preprocess.json": to_dict(PreprocessConfig(image_size=32)),
        "train.json": to_dict(TrainConfig(augment=False, batch_size=8, seed=0)),
    }
    for name, values in files.items():
        (root / name).write_text(json.dumps(values), encoding="utf-8")
    return [
        "--model-config",
        str(root / "model.json"),
        "--preprocess-config",
        str(root / "preprocess.json"),
        "--train-config",
        str(root / "train.json"),
    ]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, islam_subset):
    """Run the federation once and return its folders and the early refusal outputs."""
    from nephrolith.server.certs import make_certs
    from nephrolith.server.simulation import prepare_sites

    root = tmp_path_factory.mktemp("fed")
    certs = make_certs(root / "certs")
    wrong = make_certs(root / "other-ca")
    sites, test = prepare_sites(islam_subset, root / "data", 2, "iid", seed=0, limit=30)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    run_dir = root / "run"
    config_args = _write_configs(root)
    env = _env()

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nephrolith.server.cli",
            "start",
            "--address",
            address,
            "--certs",
            str(root / "certs"),
            "--run-dir",
            str(run_dir),
            "--rounds",
            str(ROUNDS),
            "--batch-size",
            "8",
            "--lr",
            "1e-3",
            "--no-console",
            "--dump-replies",
            "--server-data",
            str(test),
            "--server-split",
            "all",
            *config_args,
        ],
        stdout=open(root / "server.out", "wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    clients: list[subprocess.Popen] = []
    try:
        _wait_for_port(port, server, root / "server.out")

        # Refusals, while no hospital has joined yet.
        wrong_ca = subprocess.run(
            [
                sys.executable,
                "-m",
                "nephrolith.client.federation",
                "--server",
                address,
                "--ca",
                str(wrong.ca_cert),
                "--data",
                str(sites[0]),
                "--workdir",
                str(root / "bad"),
                "--max-wait",
                "10",
                "--no-check",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
        )
        plain = _run_alone(
            [
                str(Path(sys.executable).parent / "flower-supernode"),
                "--insecure",
                "--superlink",
                address,
                "--port",
                str(_free_port()),
                "--max-wait-time",
                "5",
            ],
            env,
            root / "plain.log",
        )

        for index, site in enumerate(sites):
            clients.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "nephrolith.client.federation",
                        "--server",
                        address,
                        "--ca",
                        str(certs.ca_cert),
                        "--data",
                        str(site),
                        "--workdir",
                        str(root / f"node{index}"),
                        "--threads",
                        "1",
                    ],
                    stdout=open(root / f"client{index}.out", "wb"),
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        code = server.wait(SERVER_TIMEOUT_S)
    finally:
        for process in clients:
            _stop(process)
        _stop(server)
    return {
        "root": root,
        "run_dir": run_dir,
        "sites": sites,
        "test": test,
        "code": code,
        "wrong_ca": wrong_ca,
        "plain": plain,
        "config_args": config_args,
    }


def _run_alone(command: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    """Run a Flower command and end its whole process group when it exits.

    A SuperNode's flower-superexec child outlives it for a while and keeps its
    output open, so waiting for end-of-output (subprocess.run) would hang.
    """
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            code = process.wait(180)
        finally:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(command, code, log.read_text(errors="replace"), "")


def _wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited early:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail("the Fleet API port never opened")


def _events(run_dir: Path) -> list[dict]:
    from nephrolith.server.roundlog import iter_events

    return list(iter_events(run_dir / "rounds.jsonl"))


def test_run_completes_with_round_log_and_checkpoints(federation):
    from nephrolith.common import weights

    root = federation["root"]
    assert federation["code"] == 0, (root / "server.out").read_text(errors="replace")[-4000:]
    events = _events(federation["run_dir"])
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start"
    assert kinds[-1] == "run_end"
    assert events[-1]["status"] == "completed"
    for number in range(1, ROUNDS + 1):
        replies = [e for e in events if e["event"] == "train_reply" and e["round"] == number]
        assert sorted(e["site"] for e in replies) == ["site1", "site2"]
        assert all(e["bytes"] > 0 and e["metrics"]["num-examples"] > 0 for e in replies)
        evaluated = [
            e for e in events if e["event"] == "evaluate_aggregated" and e["round"] == number
        ]
        assert evaluated and evaluated[0]["metrics"]["num-examples"] > 0
        assert any(e["event"] == "server_evaluate" and e["round"] == number for e in events)
        assert any(e["event"] == "round_end" and e["round"] == number for e in events)

    model, meta = weights.load_checkpoint(federation["run_dir"] / "checkpoints" / "last")
    provenance = meta["provenance"]
    assert provenance["strategy"] == "fedavg"
    assert provenance["round"] == ROUNDS
    assert provenance["sites"] == ["site1", "site2"]
    assert meta["class_names"] == ["no_stone", "stone"]
    assert meta["preprocess"]["image_size"] == 32
    assert (federation["run_dir"] / "checkpoints" / "best" / "metadata.json").is_file()


def test_global_weights_are_example_weighted_mean_of_replies(federation):
    from nephrolith.common import weights

    # The last checkpoint is the aggregate of the last round's accepted replies.
    dumps = sorted((federation["run_dir"] / "replies" / f"round-{ROUNDS:03d}").glob("*.npz"))
    assert [d.stem for d in dumps] == ["site1", "site2"]
    loaded = [np.load(d) for d in dumps]
    counts = np.array([float(d["num_examples"]) for d in loaded])
    model, _ = weights.load_checkpoint(federation["run_dir"] / "checkpoints" / "last")
    global_weights = weights.get_trainable(model)
    assert len(global_weights) == len([k for k in loaded[0].files if k.startswith("w")])
    for index, array in enumerate(global_weights):
        expected = (
            sum(c * d[f"w{index}"] for c, d in zip(counts, loaded, strict=True)) / counts.sum()
        )
        np.testing.assert_allclose(array, expected, rtol=1e-5, atol=1e-6)
    # The two hospitals' updates differ, so the mean is not trivially either of them.
    assert not np.allclose(loaded[0]["w0"], loaded[1]["w0"])


def test_wrong_ca_is_refused_with_a_clear_message(federation):
    result = federation["wrong_ca"]
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "not issued by the CA in" in output
    assert "other-ca/ca.pem" in output


def test_plain_text_client_is_refused(federation):
    result = federation["plain"]
    assert result.returncode != 0
    assert "could not establish a connection" in result.stdout + result.stderr
    # NOTE: gRPC logs the server side of the refused handshake only at some
    # GRPC_VERBOSITY settings, so the SuperLink log is not checked here.


def test_simulation_matches_the_process_run(federation, tmp_path):
    # Same sites, seeds and settings in Flower's simulation runtime.
    run_dir = tmp_path / "sim"
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from dataclasses import replace\n"
        "from nephrolith.common.runtime import configure_tensorflow\n"
        "configure_tensorflow(1)\n"
        "from nephrolith.server.settings import load_settings\n"
        "from nephrolith.server.simulation import simulate\n"
        "settings = load_settings(Path(sys.argv[1]))\n"
        "settings = replace(settings, run_dir=sys.argv[2], dump_replies=False)\n"
        "simulate(settings, [Path(p) for p in sys.argv[3:]], cpus=2)\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(federation["run_dir"]),
            str(run_dir),
            *map(str, federation["sites"]),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=1500,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    from nephrolith.common import weights

    sim_model, _ = weights.load_checkpoint(run_dir / "checkpoints" / "last")
    proc_model, _ = weights.load_checkpoint(federation["run_dir"] / "checkpoints" / "last")
    for sim, proc in zip(
        weights.get_trainable(sim_model), weights.get_trainable(proc_model), strict=True
    ):
        np.testing.assert_allclose(sim, proc, rtol=1e-5, atol=1e-5)
