"""The run directory: the only place an experiment writes to.

``runs/<experiment>/`` holds the resolved config, an environment record, and one folder per
stage. A stage's ``DONE`` marker is written last and holds the hash of the config sections the
stage read plus the hashes of its upstream stages, so rerunning skips finished stages and a
changed config is detected instead of silently reusing stale results.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from histodiffusion import io
from histodiffusion.config import ExperimentConfig
from histodiffusion.errors import UserError

DONE = "DONE"
STATE = "STATE.json"
LOCK = ".lock"
LOCK_INFO = ".lock.json"
_HELD: dict[Path, list] = {}  # run directories this process holds: resolved root -> [lock, depth]
_PACKAGES = ("histodiffusion", "torch", "torchvision", "diffusers", "accelerate", "timm",
             "torchmetrics", "safetensors", "numpy", "Pillow", "pydantic")


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """``cfg.run_dir`` or ``runs/<experiment>`` under the current folder."""
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.experiment


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_record(cfg: ExperimentConfig) -> dict:
    """Versions, git commit, seed and device: what is needed to reproduce a run."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = {"requested": cfg.device}
    try:
        import torch

        device["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            device["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        device["torch_threads"] = torch.get_num_threads()
    except ImportError:  # torch is a dependency; keep the record writable without it
        pass
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git_commit(),
        "seed": cfg.seed,
        "device": device,
        "packages": versions,
        "argv": sys.argv,
    }


@dataclass
class RunDir:
    """A run directory and its stage bookkeeping."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def stage_dir(self, key: str) -> Path:
        """Folder of a stage, e.g. ``pretrain`` or ``finetune/1pct``."""
        return self.root / key

    def is_done(self, key: str, stage_hash: str) -> bool:
        """True when the stage finished with the same config hash."""
        marker = self.stage_dir(key) / DONE
        return marker.is_file() and self.done_hash(key) == stage_hash

    def done_hash(self, key: str) -> str | None:
        """The hash in the stage's DONE marker, or None when it has not finished."""
        marker = self.stage_dir(key) / DONE
        if not marker.is_file():
            return None
        try:
            return json.loads(marker.read_text())["hash"]
        except (json.JSONDecodeError, KeyError):
            return None

    def _state(self, key: str) -> dict:
        """The stage's STATE.json ({} when missing or unreadable)."""
        try:
            return json.loads((self.stage_dir(key) / STATE).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def started(self, key: str) -> bool:
        """True when the stage was started (finished or not) in this run directory."""
        return any((self.stage_dir(key) / f).is_file() for f in (STATE, DONE))

    def extension(self, key: str, base_hash: str | None, steps: dict[str, int]) -> dict[str, int] | None:
        """The step counts the stage was started with when this run only asks it for more steps, else None.

        That is: the stage was started (finished or not) with the same config except its step counts
        (``base_hash``), and every step count is at least what it was. A rerun then continues from
        the stage's last checkpoint.
        """
        state = self._state(key)
        old = state.get("steps")
        if base_hash is None or state.get("base_hash") != base_hash or not isinstance(old, dict):
            return None
        if old == steps or set(old) != set(steps):
            return None
        fewer = [k for k in steps if steps[k] < old[k]]
        if fewer:
            raise UserError(
                f"stage '{key}' in {self.root} was started with more steps than asked now ("
                + ", ".join(f"{k}: {old[k]} before, {steps[k]} now" for k in fewer)
                + f"). Ask for at least as many, or rerun with --force {key.split('/')[0]} to train afresh."
            )
        return old

    def summaries(self) -> dict[str, dict]:
        """The DONE summary of every finished stage folder, by key (``pretrain``, ``finetune/1pct``)."""
        out = {}
        for marker in sorted([*self.root.glob(f"*/{DONE}"), *self.root.glob(f"*/*/{DONE}")]):
            try:
                out[str(marker.parent.relative_to(self.root))] = json.loads(marker.read_text()).get("summary", {})
            except (OSError, json.JSONDecodeError):
                continue
        return out

    def begin(self, key: str, stage_hash: str, force: bool = False, base_hash: str | None = None,
              steps: dict[str, int] | None = None, extend: bool = False) -> Path:
        """Prepare a stage folder for (re)running; refuses to mix results of two configs.

        ``extend``: the config differs only by more training steps (see :meth:`extension`), so the
        stage continues from its checkpoints under the new hash.
        """
        folder = self.stage_dir(key)
        if (force or self._state(key).get("stale")) and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        old = self.done_hash(key) or self._state(key).get("hash")
        if old is not None and old != stage_hash and not extend:
            raise UserError(
                f"stage '{key}' in {self.root} was run with a different config (hash {old}, now "
                f"{stage_hash}). Rerun with --force {key.split('/')[0]} to redo it and every stage that "
                "depends on it, or choose another --run-dir."
            )
        (folder / DONE).unlink(missing_ok=True)
        state = {"hash": stage_hash, "started": time.time()}
        if base_hash is not None:
            state.update(base_hash=base_hash, steps=steps or {})
        io.write_json(folder / STATE, state)
        return folder

    def invalidate(self, key: str) -> bool:
        """Mark a started stage stale (an upstream stage was redone): its next run starts afresh.
        Returns False when it was never started."""
        if not self.started(key):
            return False
        (self.stage_dir(key) / DONE).unlink(missing_ok=True)
        io.write_json(self.stage_dir(key) / STATE, {"stale": True, "since": time.time()})
        return True

    def abandon(self, key: str) -> bool:
        """Forget a stage that failed before writing anything (only STATE.json in its folder), so
        that a corrected config is not refused as a different one; True when it was forgotten."""
        folder = self.stage_dir(key)
        if any(p.name != STATE for p in folder.rglob("*") if p.is_file()):
            return False
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # a per-budget stage's parent folder, when now empty
            if folder.parent != self.root:
                folder.parent.rmdir()
        return True

    def finish(self, key: str, stage_hash: str, summary: dict | None = None) -> None:
        """Write the DONE marker last, holding the config hash (and an optional summary)."""
        io.write_json(self.stage_dir(key) / DONE,
                      {"hash": stage_hash, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "summary": summary or {}})

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for this process (re-entrant): another process that asks for it
        meanwhile stops at once with a UserError naming this one (pid, host, command)."""
        from filelock import FileLock, Timeout

        self.root.mkdir(parents=True, exist_ok=True)
        key = self.root.resolve()
        if key in _HELD:
            _HELD[key][1] += 1
            try:
                yield
            finally:
                _HELD[key][1] -= 1
            return
        lock = FileLock(str(self.root / LOCK), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(self._in_use()) from None
        _HELD[key] = [lock, 1]
        try:
            io.write_json(self.root / LOCK_INFO, {
                "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": shlex.join(["histodiffusion", *sys.argv[1:]])})
            yield
        finally:
            del _HELD[key]
            (self.root / LOCK_INFO).unlink(missing_ok=True)
            lock.release()

    def _in_use(self) -> str:
        """The message for a run directory another process holds."""
        try:
            info = json.loads((self.root / LOCK_INFO).read_text())
            holder = f"pid {info['pid']} on {info['host']}, since {info['started']}: {info['command']}"
        except (OSError, json.JSONDecodeError, KeyError):
            holder = "it has only just started"
        return (f"run directory {self.root} is in use by another histodiffusion process ({holder}). Wait for "
                "it to finish or stop it, then rerun; two runs in one run directory would redo the same "
                "stages and mix their files. (Or choose another --run-dir.)")

    def write_config(self, cfg: ExperimentConfig) -> dict[str, bytes | None]:
        """Write the resolved config and the environment record; returns what the two files held
        before, for :meth:`restore_config`."""
        files = (self.root / "config.yaml", self.root / "environment.json")
        before = {f.name: f.read_bytes() if f.is_file() else None for f in files}
        io.write_yaml(files[0], cfg.to_dict())
        io.write_json(files[1], environment_record(cfg))
        return before

    def restore_config(self, before: dict[str, bytes | None]) -> None:
        """Put back the config and environment records :meth:`write_config` replaced (a stage that
        failed before doing anything leaves the run directory describing the config that ran)."""
        for name, data in before.items():
            if data is None:
                (self.root / name).unlink(missing_ok=True)
            else:
                io.write_bytes(self.root / name, data)
