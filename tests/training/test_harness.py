"""The training harness (training/harness.py): the learning-rate schedule and pickle-free checkpoints
that restore the whole training state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from histodiffusion import io
from histodiffusion.errors import UserError
from histodiffusion.training.harness import (
    EMA,
    Checkpointer,
    LoopSpec,
    TrainState,
    lr_lambda,
    make_optimizer,
    run_loop,
)


def test_lr_lambda_warms_up_then_holds_or_decays_to_the_floor() -> None:
    assert [lr_lambda("constant", 2, 8)(s) for s in range(8)] == [0.5, 1, 1, 1, 1, 1, 1, 1]
    cosine = lr_lambda("cosine", 2, 10, floor=0.1)
    assert [cosine(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert cosine(6) == pytest.approx(0.55) and cosine(10) == pytest.approx(0.1) and cosine(50) == pytest.approx(0.1)
    assert lr_lambda("cosine", 0, 4, floor=0.0)(4) == pytest.approx(0.0)


def _state(seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    opt, sched = make_optimizer(model.parameters(), 1e-2, 0.01, lr_lambda("cosine", 1, 10))
    return TrainState(model, opt, sched, EMA(model, 0.9))


def _train(state: TrainState, steps: int) -> None:
    for _ in range(steps):
        state.model.train()
        state.model(torch.randn(3, 4)).square().mean().backward()  # dropout draws from the global RNG
        state.optimizer.step()
        state.lr_scheduler.step()
        state.optimizer.zero_grad()
        state.ema.update(state.model)


def test_checkpoint_restores_the_whole_training_state(tmp_path: Path) -> None:
    """Weights, optimiser moments, schedule, EMA and the global RNG come back from safetensors and
    JSON files alone, so training on from a checkpoint matches training straight through."""
    straight = _state(0)
    _train(straight, 3)
    ckpt = Checkpointer(tmp_path, keep=1)
    path = ckpt.save(straight, 3)
    assert sorted(p.name for p in path.iterdir()) == [
        "ema.json", "ema.safetensors", "meta.json", "model.safetensors", "optimizer.json",
        "optimizer.safetensors", "rng-0.safetensors", "schedule.json"]
    _train(straight, 2)

    resumed = _state(1)  # other initial weights, fresh optimiser, schedule and EMA
    assert ckpt.resume(resumed) == 3
    assert resumed.lr_scheduler.last_epoch == 3 and resumed.ema.num_updates == 3
    _train(resumed, 2)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(straight.ema.shadow.parameters(), resumed.ema.shadow.parameters(), strict=True):
        assert torch.equal(a, b)
    ckpt.save(straight, 5)
    assert [step for step, _ in ckpt.all()] == [5]  # keep=1: only the newest is kept


def test_a_damaged_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    state = _state(0)
    path = Checkpointer(tmp_path, keep=2).save(state, 1)
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match=r"cannot resume from .*step-0000001.*--force"):
        Checkpointer(tmp_path, keep=2).resume(_state(0))
    assert Checkpointer(tmp_path / "nothing", keep=2).resume(_state(0)) == 0


class _Planted:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_in_a_checkpoint_is_never_loaded(tmp_path: Path) -> None:
    """Resume reads safetensors and JSON only: pickles dropped into the checkpoint (accelerate's and
    torch's usual file names) are not opened, so a run directory from elsewhere runs no code."""
    import pickle

    state = _state(0)
    path = Checkpointer(tmp_path, keep=1).save(state, 2)
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "optimizer.bin", "pytorch_model.bin", "random_states_0.pkl",
                 "scheduler.bin", "model.pt"):
        (path / name).write_bytes(pickle.dumps(_Planted(marker)))
    resumed = _state(1)
    assert Checkpointer(tmp_path, keep=1).resume(resumed) == 2
    for a, b in zip(state.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not marker.exists()


def test_a_full_disk_while_checkpointing_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from histodiffusion.training import harness

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(harness, "save_file", full)
    with pytest.raises(UserError, match="no space left on the device .*nothing finished is lost"):
        Checkpointer(tmp_path, keep=1).save(_state(0), 1)
    assert Checkpointer(tmp_path, keep=1).latest() is None


def test_a_resumed_loop_logs_each_step_once(tmp_path: Path) -> None:
    """A crash after step 5 with the last checkpoint at step 4 (a full disk, a kill): the resumed run
    logs steps 5 and 6 again, so the records of the crashed run after step 4 are dropped first."""
    state = _state(0)

    def step_fn(step: int, crash_at: int | None = None) -> dict:
        if step == crash_at:
            raise OSError("the disk filled")
        _train(state, 1)
        return {"loss": float(step)}

    spec = LoopSpec(8, log_every=1, checkpoint_every=4)
    with pytest.raises(OSError):
        run_loop(spec, lambda s: step_fn(s, crash_at=5), folder=tmp_path, state=state, progress=False)
    assert [r["step"] for r in io.read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert run_loop(spec, step_fn, folder=tmp_path, state=state, progress=False) == 8
    records = io.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == [float(s) for s in range(8)]
