"""`nephrolith-client`: the hospital command line for data checks, training, federation and API."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from nephrolith.common.config import (
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
    from_dict,
    load_json,
    to_dict,
)
from nephrolith.common.errors import NephrolithError
from nephrolith.common.logs import setup_logging
from nephrolith.common.runtime import configure_tensorflow

logger = logging.getLogger(__name__)
console = Console(stderr=True)
app = typer.Typer(
    name="nephrolith-client",
    help="Hospital client of nephrolith: check CT data, train and evaluate locally, "
    "join a federation and serve the inference API. Images never leave this machine.",
    no_args_is_help=True,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _handle_errors(func: F) -> F:
    """Turn nephrolith errors into a one-line message and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NephrolithError as err:
            console.print(f"[bold red]error:[/] {err}")
            raise typer.Exit(code=1) from err
        except NotImplementedError as err:
            console.print(f"[bold red]unsupported input:[/] {err}")
            raise typer.Exit(code=1) from err

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(
    log_level: Annotated[str, typer.Option(help="Logging level: DEBUG, INFO, WARNING.")] = "INFO",
) -> None:
    setup_logging(log_level)
    configure_tensorflow()


ManifestOption = Annotated[
    Path | None, typer.Option(exists=True, dir_okay=False, help="Manifest CSV to use.")
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(exists=True, dir_okay=False, help="JSON with model/preprocess/train sections."),
]
ExistingDir = Annotated[
    Path, typer.Argument(exists=True, file_okay=False, help="The hospital's CT folder.")
]


@app.command("check-data")
@_handle_errors
def check_data(
    folder: ExistingDir,
    write_manifest: Annotated[
        Path | None,
        typer.Option(help="Write a manifest CSV with a seeded split by patient or group here."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Fraction of groups for validation.")] = 0.15,
    test_fraction: Annotated[float, typer.Option(help="Fraction of groups for testing.")] = 0.15,
) -> None:
    """Open every file of a CT folder, summarise it and list rejected files with reasons."""
    from nephrolith.common import data

    result = data.check_folder(folder)
    _print_check(result)
    if write_manifest is not None:
        fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
        records = data.assign_splits(result.records, fractions=fractions, seed=seed, overwrite=True)
        data.write_manifest(records, write_manifest)
        console.print(f"manifest written to {write_manifest} ({len(records)} records)")
    if not result.records:
        console.print(
            f"[bold red]error:[/] no usable CT image in {folder}; see the rejects above, "
            "or check that the folder has class sub-folders or a manifest.csv"
        )
        raise typer.Exit(code=1)


def _format_cell(value: Any) -> str:
    """Render a summary value as text: a dict as "key: value" lines, a list one item per line."""
    if isinstance(value, dict):
        lines = []
        for key, inner in sorted(value.items(), key=lambda kv: str(kv[0])):
            if isinstance(inner, dict):
                inner = ", ".join(f"{k} {v}" for k, v in inner.items())
            lines.append(f"{key or '(none)'}: {inner}")
        return "\n".join(lines)
    if isinstance(value, list | tuple):
        return "\n".join(str(item) for item in value) if value else "none"
    return str(value)


def _print_check(result: Any) -> None:
    summary = result.summary
    table = Table(title="CT folder summary")
    table.add_column("item")
    table.add_column("value")
    for key, value in summary.items():
        if key == "groups":
            # One row per group is too long for a terminal; the manifest lists them.
            continue
        table.add_row(str(key), _format_cell(value))
    console.print(table)
    if result.rejects:
        rejects = Table(title=f"{len(result.rejects)} rejected files")
        rejects.add_column("file")
        rejects.add_column("reason")
        for path, reason in result.rejects:
            rejects.add_row(str(path), reason)
        console.print(rejects)


def _configs(
    config: Path | None,
    overrides_model: dict[str, Any],
    overrides_pre: dict[str, Any],
    overrides_train: dict[str, Any],
) -> tuple[ModelConfig, PreprocessConfig, TrainConfig]:
    """Merge defaults, an optional JSON config file and command-line options."""
    base: dict[str, Any] = load_json(config) if config else {}
    unknown = sorted(set(base) - {"model", "preprocess", "train"})
    if unknown:
        raise NephrolithError(f"{config}: unknown sections {unknown}; use model, preprocess, train")
    model = {**base.get("model", {}), **{k: v for k, v in overrides_model.items() if v is not None}}
    pre = {
        **base.get("preprocess", {}),
        **{k: v for k, v in overrides_pre.items() if v is not None},
    }
    train = {**base.get("train", {}), **{k: v for k, v in overrides_train.items() if v is not None}}
    pre_cfg = from_dict(PreprocessConfig, pre, "preprocess")
    model.setdefault("input_size", pre_cfg.image_size)
    return (
        from_dict(ModelConfig, model, "model"),
        pre_cfg,
        from_dict(TrainConfig, train, "train"),
    )


@app.command("train-local")
@_handle_errors
def train_local_cmd(
    folder: ExistingDir,
    out: Annotated[Path, typer.Option(help="Run folder for the checkpoint and history.")],
    manifest: ManifestOption = None,
    config: ConfigOption = None,
    backbone: Annotated[
        str | None, typer.Option(help="Backbone source: keras, hub or compact. Default keras.")
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="Keras backbone weights: imagenet, none or a .h5 file. Default imagenet."
        ),
    ] = None,
    hub_handle: Annotated[
        str | None, typer.Option(help="TF Hub URL or local SavedModel folder (backbone hub).")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Model input side in px. Default 224.")
    ] = None,
    window: Annotated[
        str | None, typer.Option(help="HU window: soft_tissue, bone or stone. Default soft_tissue.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs. Default 10.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step. Default 16.")] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Peak AdamW rate. Default 3e-4.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for split, init and shuffling.")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Folder to cache preprocessed arrays between runs.")
    ] = None,
) -> None:
    """Train the classifier on this site's data (single-site or centralised baseline)."""
    from rich.progress import Progress

    from nephrolith.client.local import train_local

    model_cfg, pre_cfg, train_cfg = _configs(
        config,
        {
            "backbone_source": backbone,
            "backbone_weights": weights,
            "hub_handle": hub_handle,
            "input_size": image_size,
        },
        {"image_size": image_size, "window": window},
        {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed},
    )
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("training", total=train_cfg.epochs)

        def on_epoch(entry: dict[str, Any]) -> None:
            auc = entry.get("val_auc")
            progress.update(
                task,
                advance=1,
                description=f"epoch {entry['epoch']} loss {entry['loss']:.4f}"
                + (f" val_auc {auc:.3f}" if auc is not None else ""),
            )

        run = train_local(
            folder,
            out,
            model_cfg=model_cfg,
            preprocess_cfg=pre_cfg,
            train_cfg=train_cfg,
            manifest=manifest,
            cache_dir=cache_dir,
            on_epoch=on_epoch,
        )
    console.print(f"checkpoint: {run.checkpoint_dir}  threshold: {run.threshold:.4f}")
    console.print_json(json.dumps(run.val_metrics))


@app.command("cross-validate")
@_handle_errors
def cross_validate_cmd(
    folder: ExistingDir,
    out: Annotated[Path, typer.Option(help="Folder for report.json, folds.json and plots.")],
    folds: Annotated[int, typer.Option(help="Number of group folds.")] = 5,
    manifest: ManifestOption = None,
    config: ConfigOption = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples of groups for 95 % CIs.")] = 1000,
    cache_dir: Annotated[Path | None, typer.Option(help="Preprocessed-array cache folder.")] = None,
) -> None:
    """Cross-validate by group: every group is tested once by a model that never saw it."""
    from nephrolith.client.crossval import cross_validate

    model_cfg, pre_cfg, train_cfg = _configs(config, {}, {}, {})
    result = cross_validate(
        folder,
        out,
        model_cfg=model_cfg,
        preprocess_cfg=pre_cfg,
        train_cfg=train_cfg,
        n_folds=folds,
        manifest=manifest,
        cache_dir=cache_dir,
        n_boot=n_boot,
    )
    result["split"] = "out-of-fold"
    _print_metrics(result)
    console.print(f"report: {out / 'report.html'}")


@app.command("evaluate")
@_handle_errors
def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Checkpoint.")],
    folder: ExistingDir,
    out: Annotated[Path, typer.Option(help="Folder for report.json, plots and report.html.")],
    split: Annotated[str, typer.Option(help="Split to evaluate: train, val or test.")] = "test",
    manifest: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Manifest CSV with splits.")
    ] = None,
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples of groups for 95 % CIs.")] = 1000,
    seed: Annotated[
        int, typer.Option(help="Seed of the split (as in training) and bootstrap.")
    ] = 0,
    cache_dir: Annotated[Path | None, typer.Option(help="Preprocessed-array cache folder.")] = None,
) -> None:
    """Evaluate a checkpoint with CIs at image and patient/group level and write a report."""
    from nephrolith.client.local import evaluate_checkpoint

    result = evaluate_checkpoint(
        checkpoint,
        folder,
        out,
        split=split,
        manifest=manifest,
        n_boot=n_boot,
        seed=seed,
        cache_dir=cache_dir,
    )
    _print_metrics(result)
    console.print(f"report: {out / 'report.html'}")


def _print_metrics(result: dict[str, Any]) -> None:
    table = Table(title=f"{result.get('split', '')} split, threshold {result['threshold']:.4f}")
    table.add_column("metric")
    for level in ("image", "group"):
        table.add_column(level, justify="right")
    for name in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"):
        row = [name]
        for level in ("image", "group"):
            block = result.get(level, {})
            value = block.get("metrics", {}).get(name)
            ci = block.get("ci", {}).get(name)
            if value is None:
                row.append("n/a")
            elif ci and ci[0] is not None:
                row.append(f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
            else:
                row.append(f"{value:.3f}")
        table.add_row(*row)
    console.print(table)


@app.command("predict")
@_handle_errors
def predict_cmd(
    checkpoint: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Checkpoint.")],
    inputs: Annotated[
        list[Path], typer.Argument(exists=True, help="Files or DICOM series folders.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for predictions.jsonl and heatmap PNGs.")],
    heatmaps: Annotated[
        bool, typer.Option("--heatmaps/--no-heatmaps", help="Write heatmaps.")
    ] = True,
) -> None:
    """Predict the stone probability per image (and per series) with heatmaps, as JSON lines."""
    from nephrolith.client.predict import predict_paths

    written = predict_paths(checkpoint, inputs, out, heatmaps=heatmaps)
    console.print(f"{written} predictions written to {out / 'predictions.jsonl'}")


@app.command("make-demo-data")
@_handle_errors
def make_demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to write one CT folder per hospital into.")],
    hospitals: Annotated[int, typer.Option(help="Number of hospitals.")] = 3,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
) -> None:
    """Write the embedded synthetic CT data set (DICOM series in HU, stones of known size)."""
    from nephrolith.common import synth

    folders = synth.generate_federation(out, n_sites=hospitals, seed=seed)
    for folder in folders:
        console.print(str(folder))


@app.command("show-config")
def show_config() -> None:
    """Print the default model, preprocessing and training settings as JSON."""
    typer.echo(
        json.dumps(
            {
                "model": to_dict(ModelConfig()),
                "preprocess": to_dict(PreprocessConfig()),
                "train": to_dict(TrainConfig()),
            },
            indent=2,
        )
    )


def _register_commands() -> None:
    """Add `join` and `serve`, which their own modules define next to their logic."""
    from nephrolith.client import federation, serve

    federation.register_cli(app, _handle_errors)
    serve.register_cli(app, _handle_errors)


_register_commands()


def main() -> None:
    """Entry point of the `nephrolith-client` console script."""
    app()
