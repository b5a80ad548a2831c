"""`nephrolith-server start`: SuperLink with TLS, the run submitted, the round log watched."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nephrolith.server import processes
from nephrolith.server.certs import check_server_files
from nephrolith.server.roundlog import load_state
from nephrolith.server.settings import RunSettings

logger = logging.getLogger(__name__)

# Seconds between two reads of the run's state.
POLL_S = 2.0


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def run_server(
    settings: RunSettings,
    cert_dir: Path,
    address: str,
    watch: Callable[[Path, Callable[[], bool]], None] | None = None,
    node_keys: tuple[Path, ...] = (),
) -> int:
    """Run one federation to completion and return a process exit code.

    It checks the TLS files, writes federation.json and starts flower-superlink
    with TLS (Fleet API on `address`, control API on a free loopback port). Then it
    submits the nephrolith Flower App with `flwr run` and waits for the round log's
    run_end or the SuperLink's exit, showing the console when `watch` is given.
    The SuperLink is stopped at the end in every case.

    Args:
        settings: the run's settings; settings.run_dir receives every output.
        cert_dir: folder with ca.pem, server.pem and server.key.
        address: HOST:PORT of the Fleet API the hospitals connect to.
        watch: console callback watch(round_log, is_done); None only logs.
        node_keys: SuperNode public keys (<hospital>.pub). When given, the SuperLink
            accepts only these registered nodes (flwr SuperNode authentication).

    Returns:
        0 when every round completed, 1 otherwise.

    Raises:
        ConfigError: on missing certificates or a bad address.
        FederationError: when the SuperLink or `flwr run` fails to start.
    """
    ca_cert, server_cert, server_key = check_server_files(cert_dir)
    processes.split_address(address, "--address")
    run_dir = settings.path.resolve()
    settings.save()
    flwr_home = run_dir / ".flwr"
    env = processes.flower_env(flwr_home)
    control_port = processes.free_port()
    processes.write_cli_config(flwr_home, f"127.0.0.1:{control_port}", ca_cert)

    # SIGTERM (systemd, a test) must reach the finally block that stops the SuperLink.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    superlink = processes.start_superlink(
        run_dir,
        ca_cert,
        server_cert,
        server_key,
        address,
        control_port,
        env,
        node_auth=bool(node_keys),
    )
    log_copy: subprocess.Popen | None = None
    try:
        for key in node_keys:
            processes.register_node(Path(key), Path(key).stem, env)
        run_id = processes.submit_run(run_dir, env)
        logger.info("run %s submitted; round log %s", run_id, settings.round_log)
        (run_dir / "run_id").write_text(run_id + "\n", encoding="utf-8")
        log_copy = processes.stream_run_log(run_id, env, run_dir / "serverapp.log")

        last_status_check = [time.monotonic()]

        def is_done() -> bool:
            if superlink.poll() is not None or load_state(settings.round_log).finished is not None:
                return True
            # A ServerApp that crashes early never writes run_end; Flower's status shows it.
            if time.monotonic() - last_status_check[0] > 10:
                last_status_check[0] = time.monotonic()
                return processes.run_status(run_id, env).startswith("finished")
            return False

        if watch is not None:
            watch(settings.round_log, is_done)
        while not is_done():
            time.sleep(POLL_S)
    finally:
        processes.stop_process(log_copy, 5)
        processes.stop_process(superlink)

    finished = load_state(settings.round_log).finished
    if finished is None:
        logger.error(
            "the run ended without a run_end event%s%s",
            processes.log_tail(run_dir / "serverapp.log", 25),
            processes.log_tail(run_dir / "superlink.log"),
        )
        return 1
    if finished.get("status") != "completed":
        logger.error("run failed: %s", finished.get("reason"))
        return 1
    logger.info("run completed; checkpoints in %s", run_dir / "checkpoints")
    return 0
