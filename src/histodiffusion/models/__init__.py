"""Model builders, savers and loaders; every model is a diffusers-format folder (safetensors)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from safetensors import SafetensorError

from histodiffusion.errors import UserError

M = TypeVar("M")


def from_folder(cls: type[M], path: Path, missing: str) -> M:
    """``cls.from_pretrained(path)``, safetensors only. No ``config.json`` there: a UserError with the
    ``missing`` message (which says what writes it); a weights file missing, cut short or damaged: a
    UserError naming the folder and how to redo it, not the loader's traceback."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(missing)
    try:
        return cls.from_pretrained(path, use_safetensors=True)  # type: ignore[attr-defined]
    except (OSError, ValueError, SafetensorError) as err:
        raise UserError(f"the model in {path} cannot be loaded, a file of it is missing or damaged ({err}). "
                        f"Redo the stage that wrote it: `histodiffusion run CONFIG --force {_stage_of(path)}`") from err


def _stage_of(path: Path) -> str:
    """The stage whose folder holds ``path``: its first folder below the run directory (the nearest
    folder above it with the run's config.yaml and environment.json); ``STAGE`` outside one."""
    for root in path.resolve().parents:
        if (root / "config.yaml").is_file() and (root / "environment.json").is_file():
            return path.resolve().relative_to(root).parts[0]
    return "STAGE"
