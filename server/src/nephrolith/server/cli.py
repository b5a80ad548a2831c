"""`nephrolith-server`: certificates, the aggregation server, its console and the simulation."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer

from nephrolith.common.config import (
    FedConfig,
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
    from_dict,
    load_json,
)
from nephrolith.common.errors import NephrolithError
from nephrolith.common.logs import setup_logging
from nephrolith.server.settings import RunSettings

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="nephrolith-server",
    help="Federated kidney-stone detection: aggregation server (Flower over gRPC with TLS).",
    no_args_is_help=True,
    add_completion=False,
)

# Options shared by `start` and `simulate`.
StrategyOpt = Annotated[str, typer.Option(help="fedavg or fedprox.")]
MuOpt = Annotated[float, typer.Option("--mu", help="FedProx proximal coefficient mu.")]
RoundsOpt = Annotated[int, typer.Option(help="Server rounds.")]
EpochsOpt = Annotated[int, typer.Option(help="Local epochs per round.")]
BatchOpt = Annotated[int, typer.Option(help="Local batch size (images).")]
LrOpt = Annotated[float, typer.Option("--lr", help="Local peak learning rate (AdamW).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the initial model and local training.")]
TinyOpt = Annotated[
    bool,
    typer.Option(
        "--tiny/--no-tiny",
        help="Small compact-backbone model (demo, tests); ignores --model-config.",
    ),
]
ImageSizeOpt = Annotated[int, typer.Option(help="Input side in pixels when --tiny is set.")]
ModelCfgOpt = Annotated[Path | None, typer.Option(help="ModelConfig JSON file.", exists=True)]
PreCfgOpt = Annotated[Path | None, typer.Option(help="PreprocessConfig JSON file.", exists=True)]
TrainCfgOpt = Annotated[
    Path | None,
    typer.Option(
        help="TrainConfig JSON (augmentation, class weighting, weight decay).", exists=True
    ),
]
ServerDataOpt = Annotated[
    Path | None,
    typer.Option(
        help="Folder the server evaluates the global model on after every round.", exists=True
    ),
]
ServerSplitOpt = Annotated[
    str, typer.Option(help="Split of --server-data: test, val, train or all.")
]
LimitOpt = Annotated[
    int | None,
    typer.Option(
        help="Keep about this many records per hospital (and in the test set), per split and class."
    ),
]
DumpOpt = Annotated[
    bool,
    typer.Option(
        "--dump-replies/--no-dump-replies", help="Save every accepted update (audits, tests)."
    ),
]


def _default_run_dir(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _settings(
    run_dir: Path,
    fed: FedConfig,
    tiny: bool,
    image_size: int,
    model_config: Path | None,
    preprocess_config: Path | None,
    train_config: Path | None,
    server_data: Path | None,
    server_split: str,
    dump_replies: bool,
) -> RunSettings:
    if tiny:
        from nephrolith.common.model import tiny_model_config

        model = tiny_model_config(image_size)
    elif model_config is not None:
        model = from_dict(ModelConfig, load_json(model_config), str(model_config))
    else:
        model = ModelConfig()
    if preprocess_config is not None:
        pre = from_dict(PreprocessConfig, load_json(preprocess_config), str(preprocess_config))
    else:
        pre = PreprocessConfig(image_size=model.input_size)
    train = (
        from_dict(TrainConfig, load_json(train_config), str(train_config))
        if train_config is not None
        else TrainConfig(seed=fed.seed)
    )
    return RunSettings(
        run_dir=str(run_dir.resolve()),
        fed=fed,
        model=model,
        preprocess=pre,
        train=train,
        server_data=str(server_data.resolve()) if server_data else None,
        server_split=server_split,
        dump_replies=dump_replies,
    )


def _fail(err: Exception) -> None:
    logger.error("%s", err)
    raise typer.Exit(1) from err


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("certs"),
    host: Annotated[
        list[str] | None,
        typer.Option(
            help="Server host name or IP the hospitals connect to (repeatable). "
            "Default: localhost and 127.0.0.1."
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 365,
    node: Annotated[
        list[str] | None,
        typer.Option(
            help="Hospital name that gets a SuperNode authentication key pair (repeatable)."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite/--no-overwrite", help="Replace existing files.")
    ] = False,
) -> None:
    """Create the CA, the server certificate (with SANs) and optional SuperNode keys."""
    setup_logging()
    from nephrolith.server.certs import DEFAULT_HOSTS, make_certs

    try:
        paths = make_certs(out, tuple(host or DEFAULT_HOSTS), days, tuple(node or ()), overwrite)
    except NephrolithError as err:
        _fail(err)
    typer.echo(f"CA certificate (copy to every hospital): {paths.ca_cert}")
    typer.echo(f"server certificate and key (server only): {paths.server_cert}, {paths.server_key}")
    typer.echo(f"CA key (keep offline): {paths.ca_key}")
    for name, (key, pub) in paths.node_keys.items():
        typer.echo(f"{name}: private key {key} (that hospital only), public key {pub} (server)")


@app.command()
def start(
    address: Annotated[
        str,
        typer.Option(
            help="HOST:PORT of the Fleet API that hospitals connect to; use the server's "
            "network address (for example 0.0.0.0:9092) to accept other machines."
        ),
    ] = "127.0.0.1:9092",
    certs_dir: Annotated[
        Path, typer.Option("--certs", help="Folder with ca.pem, server.pem, server.key.")
    ] = Path("certs"),
    run_dir: Annotated[
        Path | None, typer.Option(help="Output folder (default runs/fed-<time>).")
    ] = None,
    strategy: StrategyOpt = "fedavg",
    mu: MuOpt = 0.01,
    rounds: RoundsOpt = 3,
    min_clients: Annotated[int, typer.Option(help="Minimum hospitals per round.")] = 2,
    fraction: Annotated[
        float, typer.Option(help="Fraction of connected hospitals trained per round.")
    ] = 1.0,
    local_epochs: EpochsOpt = 1,
    batch_size: BatchOpt = 16,
    lr: LrOpt = 3e-4,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for replies per phase.")
    ] = 3600.0,
    seed: SeedOpt = 0,
    tiny: TinyOpt = False,
    image_size: ImageSizeOpt = 64,
    model_config: ModelCfgOpt = None,
    preprocess_config: PreCfgOpt = None,
    train_config: TrainCfgOpt = None,
    server_data: ServerDataOpt = None,
    server_split: ServerSplitOpt = "test",
    console: Annotated[
        bool, typer.Option("--console/--no-console", help="Show the live console.")
    ] = True,
    dump_replies: DumpOpt = False,
    node_key: Annotated[
        list[Path] | None,
        typer.Option(
            help="SuperNode public key <hospital>.pub (repeatable); turns on node authentication "
            "so only these hospitals can join.",
            exists=True,
        ),
    ] = None,
) -> None:
    """Start the SuperLink with TLS, run the federation and keep the best and last global model."""
    setup_logging()
    from nephrolith.server.deployment import run_server

    try:
        fed = FedConfig(
            strategy=strategy,
            proximal_mu=mu,
            num_rounds=rounds,
            min_clients=min_clients,
            fraction_train=fraction,
            local_epochs=local_epochs,
            batch_size=batch_size,
            learning_rate=lr,
            round_timeout_s=round_timeout,
            seed=seed,
        )
        settings = _settings(
            run_dir or _default_run_dir("fed"),
            fed,
            tiny,
            image_size,
            model_config,
            preprocess_config,
            train_config,
            server_data,
            server_split,
            dump_replies,
        )
        watch = None
        if console:
            from nephrolith.server.console import watch as console_watch

            def watch(path: Path, is_done) -> None:  # type: ignore[no-untyped-def]
                console_watch(path, is_done)

        code = run_server(settings, certs_dir, address, watch, tuple(node_key or ()))
    except NephrolithError as err:
        _fail(err)
    typer.echo(f"run folder: {settings.run_dir}")
    raise typer.Exit(code)


@app.command()
def monitor(
    run: Annotated[Path, typer.Argument(help="Run folder or its rounds.jsonl.")],
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Keep watching until the run ends.")
    ] = True,
) -> None:
    """Show the rounds of a running or finished federation."""
    from nephrolith.server.console import watch
    from nephrolith.server.roundlog import ROUND_LOG_NAME

    path = run / ROUND_LOG_NAME if run.is_dir() else run
    if not path.exists() and not follow:
        typer.echo(
            f"{path}: no round log; pass the run folder that start or simulate wrote", err=True
        )
        raise typer.Exit(1)
    watch(path, follow=follow)


@app.command()
def partition(
    data: Annotated[Path, typer.Option(help="Source data folder.", exists=True)],
    out: Annotated[Path, typer.Option(help="Output folder for sites/<name> and server-test.")],
    hospitals: Annotated[int, typer.Option(help="Number of hospitals.")] = 3,
    scheme: Annotated[
        str, typer.Option("--partition", help="site, iid or dirichlet.")
    ] = "dirichlet",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration.")] = 0.5,
    seed: Annotated[
        int, typer.Option(help="Seed of the train/val/test split and of the partition.")
    ] = 0,
    limit: LimitOpt = None,
) -> None:
    """Share one data folder out as hospital folders (manifests pointing at the source files)."""
    setup_logging()
    from nephrolith.server.simulation import prepare_sites

    try:
        folders, test = prepare_sites(data, out, hospitals, scheme, alpha, seed, limit)
    except NephrolithError as err:
        _fail(err)
    for folder in folders:
        typer.echo(f"hospital folder: {folder}")
    if test is not None:
        typer.echo(f"server test folder: {test}")


@app.command()
def simulate(
    data: Annotated[Path, typer.Option(help="Source data folder.", exists=True)],
    hospitals: Annotated[int, typer.Option(help="Number of simulated hospitals.")] = 3,
    scheme: Annotated[
        str, typer.Option("--partition", help="site, iid or dirichlet.")
    ] = "dirichlet",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration.")] = 0.5,
    run_dir: Annotated[
        Path | None, typer.Option(help="Output folder (default runs/sim-<time>).")
    ] = None,
    strategy: StrategyOpt = "fedavg",
    mu: MuOpt = 0.01,
    rounds: RoundsOpt = 3,
    local_epochs: EpochsOpt = 1,
    batch_size: BatchOpt = 16,
    lr: LrOpt = 3e-4,
    seed: SeedOpt = 0,
    tiny: TinyOpt = False,
    image_size: ImageSizeOpt = 64,
    model_config: ModelCfgOpt = None,
    preprocess_config: PreCfgOpt = None,
    train_config: TrainCfgOpt = None,
    server_eval: Annotated[
        bool,
        typer.Option("--server-eval/--no-server-eval", help="Evaluate on the held-out test split."),
    ] = True,
    cpus: Annotated[int | None, typer.Option(help="Concurrent simulated hospitals.")] = None,
    limit: LimitOpt = None,
) -> None:
    """Run the same ServerApp and ClientApp in Flower's simulation runtime on this machine."""
    setup_logging()
    from nephrolith.server.console import watch
    from nephrolith.server.simulation import prepare_sites
    from nephrolith.server.simulation import simulate as run_simulation

    try:
        out = (run_dir or _default_run_dir("sim")).resolve()
        folders, test = prepare_sites(data, out, hospitals, scheme, alpha, seed, limit)
        fed = FedConfig(
            strategy=strategy,
            proximal_mu=mu,
            num_rounds=rounds,
            min_clients=len(folders),
            local_epochs=local_epochs,
            batch_size=batch_size,
            learning_rate=lr,
            seed=seed,
        )
        settings = _settings(
            out,
            fed,
            tiny,
            image_size,
            model_config,
            preprocess_config,
            train_config,
            test if server_eval else None,
            "all",
            False,
        )
        settings = run_simulation(settings, folders, cpus)
    except NephrolithError as err:
        _fail(err)
    watch(settings.round_log, follow=False)
    typer.echo(f"run folder: {settings.run_dir}")


def main() -> None:
    """Entry point of the nephrolith-server script."""
    app()


if __name__ == "__main__":
    main()
