"""Command line: parsing only; every command is a thin call into a stage or library function."""

from __future__ import annotations

import contextlib
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.markup import escape

from histodiffusion.config import ExperimentConfig, load_config
from histodiffusion.errors import StagePaused, UserError
from histodiffusion.progress import console, warn

app = typer.Typer(
    help="Synthetic augmentation for computational pathology: pre-train a latent diffusion model on "
    "unlabeled tiles, guide it to chosen classes, keep confident synthetic tiles, and measure the gain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Get, tile and prepare data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigArg = Annotated[Path, typer.Argument(help="Experiment YAML file, e.g. configs/smoke.yaml.")]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default runs/<experiment>).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config value: key.sub=value (repeatable).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")]
DataRootOpt = Annotated[Path | None, typer.Option("--data-root", help="Folder holding the datasets (else HISTODIFFUSION_DATA).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo this stage even if it is done.")]
TrackOpt = Annotated[list[str] | None, typer.Option("--track", help="Log training scalars and sample grids to an "
                                                  "experiment tracker: tensorboard, wandb or mlflow (repeatable; "
                                                  "same as the config's tracking).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue this stage from its last checkpoint and fail "
                                         "if it was never started here (a rerun resumes anyway; this guards "
                                         "against a mistyped --run-dir starting afresh).")]


def _load(config: Path, overrides: list[str] | None, run_dir: Path | None,
          data_root: Path | None, track: list[str] | None = None) -> ExperimentConfig:
    extra = list(overrides or [])
    if track:
        extra.append(f"tracking=[{', '.join(track)}]")
    if data_root is not None:
        extra.append(f"data.root={data_root}")
    if run_dir is not None:
        extra.append(f"run_dir={run_dir}")
    return load_config(config, extra)


def _dry_run(cfg: ExperimentConfig) -> None:
    typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)
    raise typer.Exit(0)


def _stages(command_name: str, config: Path, overrides: list[str] | None, run_dir: Path | None,
            data_root: Path | None, dry_run: bool, force: bool, resume: bool = False,
            track: list[str] | None = None) -> None:
    """Run the command's stages in order; ``--force`` and ``--resume`` apply to the last (its own stage)."""
    if force and resume:
        raise UserError("--force redoes the stage and --resume continues it: give one of them")
    cfg = _load(config, overrides, run_dir, data_root, track)
    if dry_run:
        _dry_run(cfg)
    from histodiffusion.rundir import RunDir, default_run_dir
    from histodiffusion.stages import command_stages, require_started, run_stage

    names = command_stages(command_name)
    rd = RunDir(default_run_dir(cfg))
    if resume:
        require_started(names[-1], cfg, rd)
    for name in names:
        run_stage(name, cfg, rd, force=force and name == names[-1])


def _register_stage_command(command_name: str, text: str) -> None:
    """One CLI command per entry of the stage registry's COMMANDS ('data prepare' goes under ``data``)."""
    group, _, name = command_name.rpartition(" ")
    target = data_app if group == "data" else app

    def command(config: ConfigArg, run_dir: RunDirOpt = None, set_: SetOpt = None, dry_run: DryRunOpt = False,
                data_root: DataRootOpt = None, force: ForceOpt = False, resume: ResumeOpt = False,
                track: TrackOpt = None) -> None:
        _stages(command_name, config, set_, run_dir, data_root, dry_run, force, resume, track)

    command.__doc__ = text
    command.__name__ = name.replace("-", "_")
    target.command(name)(command)


def _stage_commands() -> dict[str, str]:
    # The pipeline module is light (no torch; the stage modules are imported on first use).
    from histodiffusion.pipeline import COMMANDS

    return COMMANDS


for _name, _text in _stage_commands().items():
    _register_stage_command(_name, _text)


# ---------------------------------------------------------------------------------- data
@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="nct_crc_he_100k, pcam_full or pathmnist.")],
    data_root: DataRootOpt = None,
    size: Annotated[int, typer.Option(help="PathMNIST edge in pixels: 28, 64, 128 or 224.")] = 64,
) -> None:
    """Download a full public dataset into the data root (resumable, checksum-verified)."""
    from histodiffusion.data.fetch import fetch
    from histodiffusion.data.sources import data_root as resolve_root

    path = fetch(name, resolve_root(data_root), size=size)
    console.print(f"[green]{name} is ready at {path}[/]")


@data_app.command("tile")
def data_tile(
    inputs: Annotated[list[Path], typer.Argument(help="Large images, slides, or folders of them.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    size: Annotated[int, typer.Option(help="Tile edge in pixels.")] = 224,
    stride: Annotated[int | None, typer.Option(help="Step between tiles (default: size).")] = None,
    min_tissue: Annotated[float, typer.Option(help="Minimum tissue fraction of a kept tile.")] = 0.5,
    fmt: Annotated[str, typer.Option("--format", help="imagefolder or manifest.")] = "imagefolder",
    label: Annotated[str, typer.Option(help="Label (folder name) of the written tiles.")] = "unlabeled",
    level: Annotated[int, typer.Option(help="Pyramid level for whole slides (openslide).")] = 0,
) -> None:
    """Cut large fields or whole slides into tissue tiles (Otsu threshold on saturation)."""
    from histodiffusion.data.tiling import tile_files

    if fmt not in ("imagefolder", "manifest"):
        raise UserError(f"--format must be 'imagefolder' or 'manifest', got {fmt!r}")
    s = tile_files(list(inputs), out, size, stride, min_tissue, fmt, label=label, level=level)
    console.print(f"{s.n_tiles} tiles from {s.n_inputs} input(s) written to {out} "
                  f"({s.n_rejected_background} background tiles rejected, {s.n_too_small} inputs too small, "
                  f"{len(s.unreadable)} unreadable)")


# -------------------------------------------------------------------------- sampling
@app.command("sample")
def sample(config: ConfigArg, num: Annotated[int, typer.Option("--num", help="Number of tiles.")] = 64,
           model: Annotated[str, typer.Option(help="Stage folder holding unet/: pretrain or finetune/<budget>/adapt.")] = "pretrain",
           out: Annotated[Path | None, typer.Option(help="Output folder (default RUN_DIR/samples/<model>-<sampler><steps>).")] = None,
           run_dir: RunDirOpt = None, set_: SetOpt = None, dry_run: DryRunOpt = False,
           data_root: DataRootOpt = None) -> None:
    """Unconditional tiles from a trained UNet (sampler and steps from the config's sampling section)."""
    from histodiffusion.devices import inference_device
    from histodiffusion.diffusion.sampling import write_samples
    from histodiffusion.models.autoencoder import load_vae
    from histodiffusion.models.unet import load_unet
    from histodiffusion.rundir import RunDir, default_run_dir

    cfg = _load(config, set_, run_dir, data_root)
    if dry_run:
        _dry_run(cfg)
    if num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    rd, device, s = RunDir(default_run_dir(cfg)), inference_device(cfg.device), cfg.sampling
    out = out or rd.root / "samples" / f"{model.replace('/', '-')}-{s.sampler}{s.num_steps}"
    inside = out.resolve().is_relative_to(rd.root.resolve())
    with rd.lock() if inside else contextlib.nullcontext():  # it writes into the run directory
        unet, noise_scheduler = load_unet(rd.stage_dir(model), device)
        record = write_samples(unet, load_vae(rd.stage_dir("autoencoder"), device), noise_scheduler, out, num,
                               cfg.seed, s.model_dump(), device, extra={"model": model})
    console.print(f"{record['new']} new tiles in {record['seconds']:.1f}s -> {out} (grid: {out / 'grid.png'})")


# ---------------------------------------------------------------------------- pipeline
@app.command("run")
def run(config: ConfigArg, run_dir: RunDirOpt = None, set_: SetOpt = None, dry_run: DryRunOpt = False,
        data_root: DataRootOpt = None,
        start: Annotated[str | None, typer.Option("--from", help="First stage to run.")] = None,
        stop: Annotated[str | None, typer.Option("--to", help="Last stage to run.")] = None,
        force: Annotated[list[str] | None, typer.Option("--force", help="Redo this stage (repeatable).")] = None,
        track: TrackOpt = None) -> None:
    """Run every stage in order (data ... report), skipping finished ones and resuming interrupted ones;
    at the end, print where the report is and its headline table."""
    from histodiffusion.progress import print_headline
    from histodiffusion.rundir import RunDir, default_run_dir
    from histodiffusion.stages import run_pipeline

    cfg = _load(config, set_, run_dir, data_root, track)
    if dry_run:
        _dry_run(cfg)
    rd = RunDir(default_run_dir(cfg))
    run_pipeline(cfg, rd, start, stop, tuple(force or ()))
    if (rd.root / "report" / "results.json").is_file() and stop in (None, "report"):
        print_headline(rd.root / "report")


# -------------------------------------------------------------------------------- config
@app.command("config")
def show_config(config: Annotated[Path | None, typer.Argument(help="Experiment YAML file.")] = None,
                set_: SetOpt = None, run_dir: RunDirOpt = None, data_root: DataRootOpt = None,
                keys: Annotated[bool, typer.Option("--keys", help="List every config key with its meaning.")] = False,
                ) -> None:
    """Validate a config and print it resolved (preset and overrides applied), or list every key."""
    if keys:
        from histodiffusion.config import describe_keys

        for path, kind, text in describe_keys():
            typer.echo(f"{path:<48} {kind:<28} {text}")
        return
    if config is None:
        raise UserError("give a CONFIG file (or --keys to list the config keys)")
    _dry_run(_load(config, set_, run_dir, data_root))


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a scheduler's pre-emption), raised where the process is so that
    it unwinds as Ctrl-C does: atomic writes abandoned, the lock released, the same message."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def _interrupted(exc: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C or :class:`Terminated`) that ``exc`` is or was raised while
    handling (typer turns Ctrl-C into a silent ``Exit(130)``), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _error(err: BaseException) -> None:
    console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
    sys.exit(getattr(err, "exit_code", 2))


def guarded(entry: Callable[[], object]) -> None:
    """Run ``entry`` so that user errors print a message and exit 2, never a traceback; a full disk
    is one; a paused stage exits 3; Ctrl-C exits 130 and SIGTERM 143 saying that finished work is
    kept. (The bench scripts use it too.)"""
    from histodiffusion.io import disk_full, is_no_space

    try:
        entry()
    except UserError as err:
        _error(err)
    except StagePaused as paused:
        console.print(f"[yellow]paused:[/] {escape(str(paused))}", soft_wrap=True)
        sys.exit(paused.exit_code)
    except (KeyboardInterrupt, SystemExit) as stop:
        cause = _interrupted(stop)
        if cause is None:
            raise
        console.print(f"[yellow]interrupted{' (SIGTERM)' if isinstance(cause, Terminated) else ''}: finished "
                      "stages and checkpoints are kept; rerun the same command to resume[/]")
        sys.exit(143 if isinstance(cause, Terminated) else 130)
    except Exception as err:
        if not is_no_space(err):
            raise
        _error(disk_full(getattr(err, "filename", None)))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """The library's own warnings (unreadable tiles skipped, ...) as a line a user reads, without
    the Python source line ``warnings`` would print; any other warning as usual."""
    if category.__module__.startswith("histodiffusion."):
        warn(str(message))
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main() -> None:
    """Console entry point."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    warnings.showwarning = _show_warning
    guarded(app)
