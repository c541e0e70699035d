"""The denoising UNet (models/unet.py): attention at the named latent sizes, a save/load round trip
with its training scheduler, no pickle ever loaded, and a full disk while saving."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from histodiffusion.errors import UserError
from histodiffusion.models.unet import SCHEDULER, UNET, build_unet, load_unet, save_unet


def test_attention_sits_at_the_named_latent_sizes() -> None:
    unet = build_unet(8, 3, channels=[16, 32], layers_per_block=1, attention_resolutions=[4], attention_head_dim=8,
                      norm_num_groups=8, num_classes=2)
    assert list(unet.config.down_block_types) == ["DownBlock2D", "AttnDownBlock2D"]  # 8 x 8, then 4 x 4
    assert list(unet.config.up_block_types) == ["AttnUpBlock2D", "UpBlock2D"]
    assert unet.config.num_class_embeds == 2 and unet.config.in_channels == unet.config.out_channels == 3


def test_save_and_load_round_trip(tmp_path: Path, tiny_unet, train_scheduler) -> None:
    save_unet(tiny_unet, train_scheduler, tmp_path)
    assert (tmp_path / UNET / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / SCHEDULER / "scheduler_config.json").is_file()
    unet, scheduler = load_unet(tmp_path)
    assert not unet.training
    for (name, a), b in zip(tiny_unet.state_dict().items(), unet.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(scheduler.alphas_cumprod, train_scheduler.alphas_cumprod)
    assert scheduler.config.prediction_type == train_scheduler.config.prediction_type
    with pytest.raises(UserError, match="no trained UNet at"):
        load_unet(tmp_path / "elsewhere")


@pytest.mark.parametrize("damage", ["removed", "cut short"])
def test_a_missing_or_damaged_weights_file_names_the_folder(damage: str, tmp_path: Path, tiny_unet,
                                                            train_scheduler) -> None:
    """A run directory whose weights file was deleted or truncated (a copy interrupted, a disk
    filled by something else): a message naming the folder and how to redo it, not diffusers' OSError."""
    folder = tmp_path / "pretrain"  # a stage folder of a run directory (which holds config.yaml and environment.json)
    for record in ("config.yaml", "environment.json"):
        (tmp_path / record).write_text("{}\n")
    save_unet(tiny_unet, train_scheduler, folder)
    weights = folder / UNET / "diffusion_pytorch_model.safetensors"
    if damage == "removed":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="`histodiffusion run CONFIG --force pretrain`") as err:
        load_unet(folder)
    assert f"the model in {folder / UNET} cannot be loaded" in str(err.value)
    (tmp_path / "environment.json").unlink()  # not a run directory: the stage cannot be named
    with pytest.raises(UserError, match="`histodiffusion run CONFIG --force STAGE`"):
        load_unet(folder)



class _Planted:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_weights_file_is_never_loaded(tmp_path: Path, tiny_unet, train_scheduler) -> None:
    """A UNet folder with a pickle in place of its safetensors weights is refused, not unpickled."""
    import pickle

    save_unet(tiny_unet, train_scheduler, tmp_path)
    weights = tmp_path / UNET / "diffusion_pytorch_model.safetensors"
    marker = tmp_path / "pwned"
    weights.with_suffix(".bin").write_bytes(pickle.dumps(_Planted(marker)))
    weights.unlink()
    with pytest.raises(UserError, match="diffusion_pytorch_model.safetensors"):
        load_unet(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                    '"No space left on device" })')])
def test_a_full_disk_while_saving_a_model_is_a_user_error(tmp_path: Path, tiny_unet, train_scheduler, error,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The OSError, or safetensors' wrapping of it: either way the user reads what to do."""
    def full(*_a, **_k):
        raise error

    monkeypatch.setattr(type(tiny_unet), "save_pretrained", full)
    with pytest.raises(UserError, match=f"no space left on the device while writing {tmp_path / UNET}.*"
                                        "nothing finished is lost"):
        save_unet(tiny_unet, train_scheduler, tmp_path)
    assert not (tmp_path / UNET).exists()
