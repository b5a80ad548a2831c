"""Run the inference API under waitress (a production WSGI server), configured by arguments or env.

Environment variables (an explicit argument wins): NEPHROLITH_CHECKPOINT,
NEPHROLITH_HOST (default 127.0.0.1), NEPHROLITH_PORT (default 8000),
NEPHROLITH_THREADS (default 4), NEPHROLITH_LOG_LEVEL, and every ApiConfig field
as NEPHROLITH_<FIELD>, for example NEPHROLITH_MAX_UPLOAD_MB.

Usage: python -m nephrolith.client.serve --checkpoint CHECKPOINT_DIR --port 8000
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from nephrolith.common.errors import ConfigError, NephrolithError
from nephrolith.common.logs import setup_logging
from nephrolith.common.runtime import configure_tensorflow

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_THREADS = 4


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise ConfigError(f"{name}: expected an integer, got {raw!r}") from err


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    # waitress leaves its loop on KeyboardInterrupt, so SIGTERM from a service manager
    # stops the server the same way Ctrl-C does.
    logger.info("%s received, stopping", signal.Signals(signum).name)
    raise KeyboardInterrupt


def serve(
    checkpoint: str | Path | None = None,
    host: str | None = None,
    port: int | None = None,
    *,
    threads: int | None = None,
    config: Any = None,
) -> None:
    """Load the checkpoint once and serve the API until SIGINT or SIGTERM.

    Args:
        checkpoint: checkpoint folder; NEPHROLITH_CHECKPOINT when None.
        host: interface to bind; NEPHROLITH_HOST, then 127.0.0.1. Binding beyond
            loopback exposes the API to the hospital network, which has no
            authentication here, so put it behind the hospital's reverse proxy.
        port: TCP port, 0 for any free port; NEPHROLITH_PORT, then 8000.
        threads: waitress worker threads; NEPHROLITH_THREADS, then 4.
        config: an ApiConfig; `ApiConfig.from_env()` when None.

    Raises:
        ConfigError: when no checkpoint is given or a setting does not parse.
    """
    configure_tensorflow()
    import waitress

    from nephrolith.client.api import ApiConfig, create_app

    checkpoint = checkpoint or os.environ.get("NEPHROLITH_CHECKPOINT")
    if not checkpoint:
        raise ConfigError("no checkpoint: pass --checkpoint or set NEPHROLITH_CHECKPOINT")
    host = host or os.environ.get("NEPHROLITH_HOST") or DEFAULT_HOST
    port = _env_int("NEPHROLITH_PORT", DEFAULT_PORT) if port is None else port
    threads = threads or _env_int("NEPHROLITH_THREADS", DEFAULT_THREADS)
    config = config or ApiConfig.from_env()

    started = time.perf_counter()
    app = create_app(Path(checkpoint), config)
    predictor = app.extensions["nephrolith"]["predictor"]
    # Waitress' own body limit sits above Flask's so that Flask rejects oversized uploads
    # with its JSON 413 instead of waitress' plain-text one.
    server = waitress.create_server(
        app,
        host=host,
        port=port,
        threads=threads,
        max_request_body_size=(config.max_upload_mb + 16) * 2**20,
        ident="nephrolith",
        clear_untrusted_proxy_headers=True,
    )
    bound_port = int(server.effective_port)
    logger.info(
        "serving model %s on http://%s:%d with %d threads (started in %.1f s)",
        predictor.model_id,
        host,
        bound_port,
        threads,
        time.perf_counter() - started,
    )
    previous = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        logger.info("server on port %d stopped", bound_port)


def register_cli(app: Any, handle_errors: Callable[[Any], Any]) -> None:
    """Add the `serve` command to the client's Typer app.

    Args:
        app: the `nephrolith-client` Typer app.
        handle_errors: the CLI's decorator turning nephrolith errors into exit code 1.
    """

    @app.command("serve")
    @handle_errors
    def serve_command(
        model: Annotated[
            Path | None,
            typer.Option(
                file_okay=False,
                help="Checkpoint folder (metadata.json + model.weights.h5); "
                "default NEPHROLITH_CHECKPOINT.",
            ),
        ] = None,
        host: Annotated[
            str | None,
            typer.Option(help=f"Interface to bind; default NEPHROLITH_HOST or {DEFAULT_HOST}."),
        ] = None,
        port: Annotated[
            int | None,
            typer.Option(
                help=f"TCP port, 0 picks a free one; default NEPHROLITH_PORT or {DEFAULT_PORT}."
            ),
        ] = None,
        threads: Annotated[
            int | None,
            typer.Option(help=f"Worker threads; default NEPHROLITH_THREADS or {DEFAULT_THREADS}."),
        ] = None,
    ) -> None:
        """Serve the inference API and web page under waitress until Ctrl-C or SIGTERM."""
        serve(model, host, port, threads=threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, serve, and return a process exit code (1 for a config or model error)."""
    parser = argparse.ArgumentParser(
        prog="python -m nephrolith.client.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint folder (default: NEPHROLITH_CHECKPOINT)",
    )
    parser.add_argument("--host", default=None, help=f"interface to bind (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"TCP port, 0 picks a free one (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help=f"worker threads (default {DEFAULT_THREADS})"
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO)")
    args = parser.parse_args(argv)

    setup_logging(args.log_level)
    try:
        serve(args.checkpoint, args.host, args.port, threads=args.threads)
    except NephrolithError as err:
        logger.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
