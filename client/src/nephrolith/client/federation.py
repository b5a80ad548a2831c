"""`nephrolith-client join`: check the data folder, then run a Flower SuperNode over TLS."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from nephrolith.common.errors import ConfigError, DataError, NephrolithError

logger = logging.getLogger(__name__)

# Patterns in the SuperNode's output, and what they mean for the hospital's operator.
_DIAGNOSES: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED|unable to get local issuer", re.I),
        "TLS handshake failed: the server's certificate was not issued by the CA in {ca}. "
        "Get the federation's ca.pem from the server operator.",
    ),
    (
        re.compile(r"certificate has expired|CERTIFICATE_EXPIRED", re.I),
        "TLS handshake failed: the server's certificate has expired; ask the operator to "
        "renew it (nephrolith-server certs).",
    ),
    (
        re.compile(r"Peer name .* is not in peer certificate|hostname|subject ?alt", re.I),
        "TLS handshake failed: the server certificate is not valid for {server}; connect with "
        "a host name or IP listed in the certificate, or ask the operator to add it.",
    ),
    (
        re.compile(r"Failed to activate SuperNode", re.I),
        "the server requires SuperNode authentication and did not accept this node's key: "
        "pass --auth-key <hospital>.key and ask the operator to register <hospital>.pub.",
    ),
    (
        re.compile(
            r"Connection refused|failed to connect to all addresses|Socket closed|"
            r"DNS resolution failed|Deadline Exceeded",
            re.I,
        ),
        "cannot reach the federation server at {server}: check the address and port, that the "
        "server is running, and that it uses TLS.",
    ),
]


class JoinError(NephrolithError):
    """The SuperNode failed to join the federation. The message gives the cause and the fix."""


def _check_data(data: Path) -> int:
    """Run the same checks as `check-data`; return the usable record count.

    Raises:
        DataError: when the folder is missing, unusable or has rejected files.
    """
    from nephrolith.common import data as data_mod

    if not data.is_dir():
        raise DataError(f"{data}: data folder not found; pass the hospital's CT folder with --data")
    result = data_mod.check_folder(data)
    if not result.records_ok:
        raise DataError(f"{data}: no usable labelled image; run `nephrolith-client check-data`")
    if result.rejects:
        shown = "; ".join(f"{p}: {r}" for p, r in result.rejects[:3])
        raise DataError(
            f"{data}: {len(result.rejects)} file(s) failed the checks ({shown}); fix or remove "
            "them (see `nephrolith-client check-data`), or join with --allow-rejects"
        )
    return len(result.records_ok)


def _flower_bin(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        raise JoinError(f"{name} not found next to {sys.executable} or on PATH; install flwr")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _toml_literal(value: str, what: str) -> str:
    if "'" in value or "\n" in value:
        raise ConfigError(f"{what}: quotes and line breaks are not supported, got {value!r}")
    return f"'{value}'"


def diagnose(output: str, server: str, ca: Path) -> str | None:
    """Return the operator-facing reason for a SuperNode failure found in its output."""
    for pattern, message in _DIAGNOSES:
        if pattern.search(output):
            return message.format(server=server, ca=ca)
    return None


def supernode_command(
    server: str,
    ca: Path,
    data: Path,
    name: str,
    cache_dir: Path | None,
    max_wait_s: float,
    auth_key: Path | None = None,
) -> list[str]:
    """Return the flower-supernode command line for one hospital."""
    node_config = [
        f"data-dir={_toml_literal(str(data), '--data')}",
        f"site-id={_toml_literal(name, '--name')}",
    ]
    if cache_dir is not None:
        node_config.append(f"cache-dir={_toml_literal(str(cache_dir), 'cache folder')}")
    command = [
        _flower_bin("flower-supernode"),
        "--root-certificates",
        str(ca),
        "--superlink",
        server,
        "--port",
        str(_free_port()),
        "--node-config",
        " ".join(node_config),
        "--max-wait-time",
        str(max_wait_s),
    ]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    return command


def join(
    server: str,
    ca: Path,
    data: Path,
    *,
    name: str | None = None,
    workdir: Path | None = None,
    check: bool = True,
    allow_rejects: bool = False,
    max_wait_s: float = 60.0,
    threads: int | None = None,
    auth_key: Path | None = None,
) -> int:
    """Join the federation at `server` and take part in its runs until stopped.

    The SuperNode keeps its connection open across runs; stop it with Ctrl-C or
    SIGTERM. What leaves this machine: the model's trainable weights after local
    training, the example counts, loss and validation metrics, the site name and
    data-quality warnings. Images, file names and patient ids stay here.

    Args:
        server: HOST:PORT of the federation server's Fleet API.
        ca: the federation's CA certificate (ca.pem) that signed the server certificate.
        data: the hospital's CT folder (manifest.csv or class sub-folders).
        name: site name shown in the server's round log; defaults to the folder name.
        workdir: folder for the SuperNode's state, log and preprocessing cache;
            defaults to ./runs/node-<name>.
        check: open every file first, as `check-data` does.
        allow_rejects: join even when some files fail the checks (they are skipped).
        max_wait_s: give up when the server stays unreachable this long (seconds).
        threads: TensorFlow threads per op for local training; None keeps the default.
        auth_key: SuperNode private key, when the server enables node authentication.

    Returns:
        0 after a clean stop (signal), 1 when the SuperNode exits with an error.

    Raises:
        ConfigError: on a missing CA file or bad argument.
        DataError: when the data folder fails its checks.
        JoinError: when the SuperNode fails; the message names the cause (wrong CA,
            unreachable server, certificate not valid for the address).
    """
    ca, data = Path(ca).resolve(), Path(data).resolve()
    if not ca.is_file():
        raise ConfigError(f"{ca}: CA certificate not found; copy ca.pem from the server operator")
    name = name or data.name
    if check:
        try:
            count = _check_data(data)
            logger.info("%s: %d records passed the checks", data, count)
        except DataError:
            if not allow_rejects:
                raise
            logger.warning("%s: some files failed the checks; they are skipped", data)
    workdir = Path(workdir or Path("runs") / f"node-{name}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    # Flower starts its helpers (flower-superexec, flwr-clientapp) by name from PATH.
    bin_dir = str(Path(_flower_bin("flower-supernode")).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env.update(
        FLWR_HOME=str(workdir / ".flwr"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    if threads is not None:
        env.update(TF_NUM_INTRAOP_THREADS=str(threads), TF_NUM_INTEROP_THREADS="1")
    command = supernode_command(server, ca, data, name, workdir / "cache", max_wait_s, auth_key)
    logger.info("joining %s as %s (log: %s)", server, name, workdir / "supernode.log")
    return _run_supernode(command, env, workdir / "supernode.log", server, ca)


def _run_supernode(
    command: list[str], env: dict[str, str], log_file: Path, server: str, ca: Path
) -> int:
    """Run the SuperNode, copying its output to `log_file`, until it exits or we are signalled."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    stopped = threading.Event()
    tail: list[str] = []

    def copy_output() -> None:
        # Helpers of the SuperNode inherit the pipe and may outlive it, so this
        # thread is not joined without a timeout.
        with open(log_file, "a", encoding="utf-8") as handle:
            for raw in process.stdout:  # type: ignore[union-attr]
                line = raw.decode("utf-8", errors="replace")
                handle.write(line)
                handle.flush()
                tail.append(line)
                del tail[:-40]

    def forward(signum: int, _frame: object) -> None:
        stopped.set()
        _terminate_group(process.pid)

    reader = threading.Thread(target=copy_output, daemon=True)
    reader.start()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = _wait_with_grace(process, stopped)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        # flower-superexec stays in the SuperNode's process group and retries for a
        # while after the SuperNode exits; end it with the group.
        _terminate_group(process.pid)
        reader.join(10)
    if stopped.is_set():
        logger.info("SuperNode stopped")
        return 0
    if code != 0:
        reason = diagnose("".join(tail), server, ca) or f"SuperNode exited with code {code}"
        raise JoinError(f"{reason} (SuperNode log: {log_file})")
    return 0


def _wait_with_grace(
    process: subprocess.Popen, stopped: threading.Event, grace_s: float = 15.0
) -> int:
    """Wait for the SuperNode; once a stop was requested, kill its group after `grace_s`.

    A SuperNode that is reconnecting to a SuperLink that went away can ignore SIGTERM.
    """
    stop_seen: float | None = None
    while True:
        try:
            return process.wait(0.5)
        except subprocess.TimeoutExpired:
            pass
        if stopped.is_set():
            stop_seen = stop_seen or time.monotonic()
            if time.monotonic() - stop_seen > grace_s:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _terminate_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def register_cli(app: Any, handle_errors: Callable[[Any], Any]) -> None:
    """Add the `join` command to the nephrolith-client Typer app."""

    @app.command("join")
    @handle_errors
    def join_command(
        server: Annotated[str, typer.Option(help="HOST:PORT of the federation server.")],
        ca: Annotated[Path, typer.Option(help="The federation's CA certificate (ca.pem).")],
        data: Annotated[Path, typer.Option(help="This hospital's CT folder.")],
        name: Annotated[
            str | None,
            typer.Option(help="Site name shown on the server (default: the folder name)."),
        ] = None,
        workdir: Annotated[
            Path | None,
            typer.Option(
                help="Folder for the SuperNode log, state and cache (default runs/node-<name>)."
            ),
        ] = None,
        check: Annotated[
            bool,
            typer.Option("--check/--no-check", help="Open every file first, as check-data does."),
        ] = True,
        allow_rejects: Annotated[
            bool,
            typer.Option(
                "--allow-rejects/--no-allow-rejects",
                help="Join even when some files fail the checks.",
            ),
        ] = False,
        max_wait: Annotated[
            float, typer.Option(help="Seconds to keep trying an unreachable server.")
        ] = 60.0,
        threads: Annotated[
            int | None, typer.Option(help="TensorFlow threads per op for local training.")
        ] = None,
        auth_key: Annotated[
            Path | None,
            typer.Option(
                help="SuperNode private key when the server requires node authentication."
            ),
        ] = None,
    ) -> None:
        """Join a federation over TLS and train on this hospital's data in every round."""
        code = join(
            server,
            ca,
            data,
            name=name,
            workdir=workdir,
            check=check,
            allow_rejects=allow_rejects,
            max_wait_s=max_wait,
            threads=threads,
            auth_key=auth_key,
        )
        raise typer.Exit(code)


def main() -> None:
    """Run `join` alone: `python -m nephrolith.client.federation --server H:P --ca C --data D`."""
    from nephrolith.common.logs import setup_logging

    setup_logging()
    standalone = typer.Typer(add_completion=False)

    def report(func: Any) -> Any:
        import functools

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except NephrolithError as err:
                logger.error("%s", err)
                raise typer.Exit(1) from err

        return wrapper

    register_cli(standalone, report)
    standalone(sys.argv[1:])


if __name__ == "__main__":
    main()
