"""Start, watch and stop Flower's processes (SuperLink, flwr CLI) for nephrolith-server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from nephrolith.common.errors import ConfigError, NephrolithError

logger = logging.getLogger(__name__)

# The Flower App folder that `flwr run` bundles (components point at installed modules).
APP_DIR = Path(__file__).resolve().parent / "flwr_app"
CONNECTION_NAME = "nephrolith"


class FederationError(NephrolithError):
    """A Flower process failed to start, or a run did not complete."""


def flower_bin(name: str) -> str:
    """Return the path of a Flower executable, preferring the running interpreter's venv."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise FederationError(f"{name} not found next to {sys.executable} or on PATH; install flwr")
    return found


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment for Flower processes: own FLWR_HOME, no telemetry or update check."""
    env = dict(os.environ)
    # Flower starts its helpers (flower-superexec, flwr-serverapp) by name from PATH.
    bin_dir = str(Path(flower_bin("flower-superlink")).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def split_address(address: str, option: str) -> tuple[str, int]:
    """Split "HOST:PORT" (IPv6 as "[::1]:PORT") into host and port.

    Raises:
        ConfigError: naming `option` when the address has no valid port.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ConfigError(f"{option}: expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str,
    port: int,
    timeout_s: float,
    process: subprocess.Popen | None,
    log_file: Path | None = None,
) -> None:
    """Wait until host:port accepts TCP connections.

    Raises:
        FederationError: when `process` exits first or the timeout passes; the
            message quotes the end of `log_file`.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise FederationError(
                f"process exited with code {process.returncode} before {host}:{port} opened"
                f"{log_tail(log_file)}"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise FederationError(
        f"{host}:{port} did not open within {timeout_s:.0f} s{log_tail(log_file)}"
    )


def log_tail(log_file: Path | None, lines: int = 15) -> str:
    """Return the last lines of a log file, formatted for an error message."""
    if log_file is None or not Path(log_file).is_file():
        return ""
    text = Path(log_file).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return "\n--- last lines of " + str(log_file) + " ---\n" + "\n".join(text)


def write_cli_config(flwr_home: Path, control_address: str, ca_cert: Path) -> Path:
    """Write $FLWR_HOME/config.toml so `flwr run/ls/log` reach our SuperLink over TLS."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f'default = "{CONNECTION_NAME}"\n\n'
        f"[superlink.{CONNECTION_NAME}]\n"
        f'address = "{control_address}"\n'
        f"root-certificates = {json.dumps(str(Path(ca_cert).resolve()))}\n",
        encoding="utf-8",
    )
    return path


def start_superlink(
    run_dir: Path,
    ca_cert: Path,
    server_cert: Path,
    server_key: Path,
    fleet_address: str,
    control_port: int,
    env: dict[str, str],
    node_auth: bool = False,
) -> subprocess.Popen:
    """Launch flower-superlink with TLS; its output goes to run_dir/superlink.log.

    The Fleet API (gRPC, what hospitals connect to) listens on `fleet_address`; the
    Control and Runtime HTTP APIs listen on 127.0.0.1:`control_port` only, because
    in flwr 1.39 they accept commands (start/stop runs) without account auth.
    """
    log_file = run_dir / "superlink.log"
    command = [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(ca_cert),
        "--ssl-certfile",
        str(server_cert),
        "--ssl-keyfile",
        str(server_key),
        "--fleet-api-address",
        fleet_address,
        "--host",
        "127.0.0.1",
        "--port",
        str(control_port),
        "--disable-runtime-dependency-installation",
        "--database",
        str(run_dir / "superlink.db"),
    ]
    if node_auth:
        command.append("--enable-supernode-auth")
    logger.info(
        "starting SuperLink: Fleet API %s, control 127.0.0.1:%d", fleet_address, control_port
    )
    with open(log_file, "ab") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    host, port = split_address(fleet_address, "--address")
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    wait_for_port(probe_host, port, 60, process, log_file)
    wait_for_port("127.0.0.1", control_port, 60, process, log_file)
    return process


def register_node(public_key: Path, name: str, env: dict[str, str]) -> None:
    """Register a hospital's SuperNode public key with `flwr supernode register`.

    Raises:
        FederationError: when Flower rejects the key (for example, already in use).
    """
    command = [flower_bin("flwr"), "supernode", "register", str(public_key), "--name", name]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0:
        raise FederationError(
            f"{public_key}: SuperNode registration failed: "
            f"{done.stdout.strip()} {done.stderr.strip()}"
        )
    logger.info("registered SuperNode key %s as %s", public_key.name, name)


def submit_run(run_dir: Path, env: dict[str, str]) -> str:
    """Submit the nephrolith Flower App to the SuperLink with `flwr run` and return the run id.

    Raises:
        FederationError: when flwr run fails; the message quotes its output.
    """
    command = [
        flower_bin("flwr"),
        "run",
        str(APP_DIR),
        "--run-config",
        f"run-dir={json.dumps(str(Path(run_dir).resolve()))}",
        "--format",
        "json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    payload = _last_json(done.stdout)
    if done.returncode != 0 or not payload or not payload.get("success"):
        raise FederationError(
            f"flwr run failed (exit code {done.returncode}): "
            f"{done.stdout.strip()} {done.stderr.strip()}"
        )
    return str(payload["run-id"])


def _last_json(text: str) -> dict | None:
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return None


def run_status(run_id: str, env: dict[str, str]) -> str:
    """Return the run's status from `flwr ls`, for example "running" or "finished:completed"."""
    command = [flower_bin("flwr"), "ls", "--run-id", run_id, "--format", "json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    payload = _last_json(done.stdout) or {}
    for run in payload.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "unknown"))
    return "unknown"


def stream_run_log(run_id: str, env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """Copy the ServerApp's log (`flwr log --stream`) into `log_file` in the background."""
    handle = open(log_file, "ab")  # noqa: SIM115 - the child owns the handle until it exits
    try:
        return subprocess.Popen(
            [flower_bin("flwr"), "log", run_id, "--stream"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    finally:
        handle.close()


def descendants(pid: int) -> list[int]:
    """Return the ids of all processes below `pid` (children first level first), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def stop_process(process: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    """Stop a process we started and everything it started (SIGTERM, then SIGKILL).

    Flower's SuperLink and SuperNode start helpers in their own sessions
    (flower-superexec, flwr-serverapp, flwr-clientapp), so the whole tree is
    collected by parent id before the first signal; a SuperLink with an active
    run does not exit on SIGTERM alone.
    """
    if process is None or process.poll() is not None:
        return
    tree = descendants(process.pid)
    _signal_all([process.pid, *tree], signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        tree += [p for p in descendants(process.pid) if p not in tree]
        _signal_all([process.pid, *tree], signal.SIGKILL)
        process.wait(5)
    # Helpers re-parented to init when their parent ended (checked by name against pid reuse).
    _signal_all([p for p in tree if _is_flower(p)], signal.SIGKILL)


def _is_flower(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"flower-" in command or b"flwr-" in command
