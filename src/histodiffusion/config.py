"""Experiment configs: one YAML file per experiment, validated into typed objects on load.

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key path
and what was expected. Model-size presets come from :mod:`histodiffusion.presets` and sit *under*
the file's own values: whatever the file (or ``--set``) says wins.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from histodiffusion import io
from histodiffusion.errors import ConfigError
from histodiffusion.presets import PRESETS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# --------------------------------------------------------------------------------------- data
class TileCfg(_Section):
    """Cut images larger than ``size`` into tiles (large fields, whole slides)."""

    size: Annotated[int, Field(ge=16, le=4096)] = 224
    """Tile edge in pixels at the source resolution."""
    stride: Annotated[int, Field(ge=1)] | None = None
    """Step between tiles in pixels; defaults to ``size`` (no overlap)."""
    min_tissue: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5
    """Keep a tile when at least this fraction of it is tissue (Otsu threshold on saturation)."""


class SourceCfg(_Section):
    """One image source: a named dataset under the data root, or a path."""

    dataset: str | None = None
    """Named dataset under the data root (pcam, ebhi, lc25000, nct_crc_he, kather2016, unlabeled_he, pathmnist)."""
    path: str | None = None
    """An ImageFolder folder, a CSV manifest (path,label[,group][,split]) or a PathMNIST-format .npz."""
    format: Literal["auto", "imagefolder", "csv", "pathmnist"] = "auto"
    """How to read ``path``; ``auto`` decides from the file or folder."""
    splits: list[str] | None = None
    """Use only these splits of the source (for example [train]); all when omitted."""
    labels: list[str] | None = None
    """Use only images of these labels (e.g. keep a pool free of one organ); all when omitted."""
    weight: Annotated[float, Field(gt=0.0)] = 1.0
    """Relative sampling weight of this source in the pre-training pool."""
    tile: TileCfg | None = None
    """Cut images larger than the tile size into tiles first (needed for large fields)."""
    max_images: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many images of the source (seeded sample), for quick runs."""

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"dataset": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_of(self) -> SourceCfg:
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of 'dataset' (a named dataset) or 'path'")
        return self

    @property
    def name(self) -> str:
        """Short name for tables and file names."""
        return self.dataset or Path(self.path).stem  # type: ignore[arg-type]


Budget = Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
"""A random seed: numpy and torch take 0 .. 2**32 - 1."""


def budget_name(budget: int | float) -> str:
    """Folder-safe name of a label budget: 0.01 -> '1pct', 20 -> '20perclass'."""
    if isinstance(budget, int) and not isinstance(budget, bool):
        return f"{budget}perclass"
    pct = budget * 100
    text = f"{pct:.4f}".rstrip("0").rstrip(".").replace(".", "p")
    return f"{text}pct"


class TargetCfg(SourceCfg):
    """The target dataset: the small labeled subset, its valid and test splits."""

    split_by: Literal["auto", "own", "group", "stratified"] = "auto"
    """``own``: the dataset's train/valid/test folders; ``group``: by case id; ``stratified``: by
    file. ``auto`` picks own, else group when groups exist, else stratified."""
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Train/valid/test fractions when the dataset has no split of its own."""
    split_seed: Seed = 0
    """Seed of the train/valid/test split (fixed per task; independent of ``seed``)."""
    valid_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    """With split_by own and a dataset that has train and test but no valid split: the fraction of
    train held out as valid (stratified; by case when groups exist)."""
    budgets: Annotated[list[Budget], Field(min_length=1)] = [0.05]
    """Label budgets: a fraction of the train split (0.01 = 1%) or a count per class (20)."""
    classes: list[str] | None = None
    """Use only these classes, in this order (default: all, sorted)."""
    max_per_class: Annotated[int, Field(ge=1)] | None = None
    """Cap train, valid and test at this many images per class (seeded), for quick runs."""

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("three positive fractions (train, valid, test) that sum to 1")
        return v

    @field_validator("budgets")
    @classmethod
    def _distinct(cls, v: list) -> list:
        names = [budget_name(b) for b in v]
        if len(set(names)) != len(names):
            raise ValueError(f"budgets must be distinct, got {names}")
        return v


class DataCfg(_Section):
    """Where the images come from and how they are prepared."""

    root: str | None = None
    """Data root holding the named datasets (else --data-root, HISTODIFFUSION_DATA, or the cache dir)."""
    resolution: Annotated[int, Field(ge=8, le=2048)] = 64
    """Edge of the square tiles every stage works at, in pixels (tiles are centre-cropped and resized)."""
    target: TargetCfg
    pool: Annotated[list[SourceCfg], Field(min_length=1)]
    """Unlabeled pre-training sources (labels ignored); must not contain target files."""
    pool_target_train: bool = False
    """The practical protocol: add the target's train tiles that are in no label budget's subset,
    labels dropped, to the pool (a user's own unlabeled cohort). Valid and test tiles never enter
    the pool. Off: the paper's protocol, the target excluded from pre-training."""
    pool_max: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many pool tiles (weighted, seeded sample), for quick runs."""
    max_bad_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    """Fail when more than this fraction of a split's files cannot be read."""
    cache_shard_size: Annotated[int, Field(ge=16)] = 4096
    """Tiles per memory-mapped cache shard."""
    num_workers: Annotated[int, Field(ge=0)] = 0
    """Processes decoding images while the tile cache is built (0: in the main process)."""


# ------------------------------------------------------------------------------- training
class TrainCfg(_Section):
    """Optimisation settings shared by every training stage."""

    steps: Annotated[int, Field(ge=1)] = 1000
    """Optimiser steps."""
    batch_size: Annotated[int, Field(ge=1)] = 64
    """Batch size per device (per process under accelerate)."""
    gradient_accumulation: Annotated[int, Field(ge=1)] = 1
    """Micro-batches per optimiser step (effective batch = batch_size x this x processes)."""
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-4
    """Peak learning rate (AdamW)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: constant, or cosine decay to 10% of the peak."""
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    """Linear learning-rate warm-up from 0 over this many steps."""
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    """AdamW weight decay."""
    grad_clip: Annotated[float, Field(gt=0.0)] | None = 1.0
    """Clip the gradient norm to this value (null: no clipping)."""
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    """Decay of the parameter EMA that is saved as the final model."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on a GPU that supports it, fp32 on a CPU."""
    log_every: Annotated[int, Field(ge=1)] = 50
    """Append averaged metrics to metrics.jsonl every this many steps."""
    checkpoint_every: Annotated[int, Field(ge=1)] = 500
    """Save the full training state every this many steps (resume point)."""
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    """Keep this many newest checkpoints (rotation)."""
    time_limit_minutes: Annotated[float, Field(gt=0.0)] | None = None
    """Stop after this many minutes of this invocation (checkpointed); rerunning continues. Lets a
    long run span several sessions, and compares settings at equal compute."""


class AutoencoderArch(_Section):
    """KL autoencoder (diffusers AutoencoderKL) layout."""

    downsample_factor: Literal[2, 4, 8, 16] = 4
    """Tile edge / latent edge (the paper: 4)."""
    channels: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2)] = [64, 128, 128]
    """Channels per resolution level: log2(downsample_factor) + 1 entries."""
    layers_per_block: Annotated[int, Field(ge=1)] = 1
    """ResNet blocks per resolution level of the encoder (the decoder has one more)."""
    latent_channels: Annotated[int, Field(ge=1)] = 3
    """Channels of the latent (the paper: 3)."""
    norm_num_groups: Annotated[int, Field(ge=1)] = 32
    """GroupNorm groups (must divide every entry of channels)."""
    mid_attention: bool = False
    """Self-attention in the bottleneck (costly at high resolution)."""

    @model_validator(mode="after")
    def _levels(self) -> AutoencoderArch:
        need = self.downsample_factor.bit_length()  # log2(f) + 1
        if len(self.channels) != need:
            raise ValueError(f"channels needs {need} entries for downsample_factor {self.downsample_factor} "
                             f"(one per resolution level), got {len(self.channels)}")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every entry of channels must be divisible by norm_num_groups={self.norm_num_groups}")
        return self


class AutoencoderCfg(_Section):
    """Stage ``autoencoder``: train the KL autoencoder on the pool and measure the latent scale."""

    arch: AutoencoderArch = AutoencoderArch()
    train: TrainCfg = TrainCfg(lr=2e-4, steps=4000, batch_size=32, ema_decay=0.0)
    kl_weight: Annotated[float, Field(ge=0.0)] = 1e-6
    """Weight of the KL term relative to the L1 term summed over pixels (LDM's 1e-6)."""
    ssim_weight: Annotated[float, Field(ge=0.0)] = 0.2
    """Weight of (1 - SSIM) beside the L1 term."""
    perceptual_weight: Annotated[float, Field(ge=0.0)] = 0.0
    """LPIPS (VGG) weight; needs the LPIPS/VGG weights on disk (0: off)."""
    disc_weight: Annotated[float, Field(ge=0.0)] = 0.0
    """Patch-discriminator (hinge) weight in the generator loss (0: off)."""
    disc_start: Annotated[int, Field(ge=0)] = 2000
    """Step at which the discriminator switches on."""
    holdout_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.05
    """Pool tiles held out for reconstruction PSNR/SSIM."""
    latent_normalization: Literal["per_channel", "global"] = "per_channel"
    """per_channel: zero mean, unit std per latent channel (stored as latents_mean/latents_std
    beside scaling_factor); global: scaling_factor = 1 / std only (the original LDM)."""
    train_crop: Annotated[int, Field(ge=8)] | None = None
    """Train on random square crops of this edge (the convolutional autoencoder is applied to whole
    tiles afterwards, as in LDM); null: whole tiles. Crops cut the cost per step."""


class UNetArch(_Section):
    """Denoising UNet (diffusers UNet2DModel) layout."""

    channels: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [64, 128, 256]
    """Channels per resolution level."""
    layers_per_block: Annotated[int, Field(ge=1)] = 2
    """ResNet blocks per level on the way down (one more on the way up)."""
    attention_resolutions: list[int] = [8]
    """Latent edge lengths (in latent pixels) whose level has self-attention."""
    attention_head_dim: Annotated[int, Field(ge=1)] = 32
    """Channels per attention head."""
    norm_num_groups: Annotated[int, Field(ge=1)] = 32
    """GroupNorm groups (must divide every entry of channels)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Dropout in the ResNet blocks."""

    @model_validator(mode="after")
    def _groups(self) -> UNetArch:
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"every entry of channels must be divisible by norm_num_groups={self.norm_num_groups}")
        return self


class DiffusionCfg(_Section):
    """Forward process and training objective (shared by pre-training, fine-tuning, sampling)."""

    num_train_timesteps: Annotated[int, Field(ge=10)] = 1000
    """Length T of the forward process."""
    schedule: Literal["sqrt_linear", "linear", "cosine"] = "sqrt_linear"
    """sqrt_linear: LDM's 'linear' schedule, sqrt(beta) linear in t (diffusers 'scaled_linear');
    linear: beta linear in t; cosine: Nichol & Dhariwal 2021."""
    beta_start: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.0015
    """beta_1 (the paper: 0.0015); ignored by the cosine schedule."""
    beta_end: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.0155
    """beta_T (the paper: 0.0155); ignored by the cosine schedule."""
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    """What the UNet predicts: the noise (epsilon, the paper) or v = sqrt(a) eps - sqrt(1 - a) x_0
    (default: in bench/results/pretrain_trials it gave tissue colours where epsilon gave colour casts)."""
    min_snr_gamma: Annotated[float, Field(gt=0.0)] | None = 5.0
    """Min-SNR loss weighting (Hang et al. 2023) with this gamma (null: uniform, the paper)."""


class PretrainCfg(_Section):
    """Stage ``pretrain``: unconditional LDM on the pool's latents."""

    unet: UNetArch = UNetArch()
    train: TrainCfg = TrainCfg(lr=2e-4, steps=20000, batch_size=64, ema_decay=0.999)
    dihedral: bool = True
    """Random flips and 90-degree rotations of latents (tissue has no orientation)."""
    sample_every: Annotated[int, Field(ge=0)] = 1000
    """Write a sample grid every this many steps (0: only at the end)."""
    num_preview: Annotated[int, Field(ge=1, le=256)] = 36
    """Tiles in each preview grid."""


class SamplingCfg(_Section):
    """Sampler used for previews, ``sample`` and ``synthesize``."""

    sampler: Literal["ddim", "dpmpp", "ddpm"] = "ddim"
    """ddim (any step count, eta), dpmpp (DPM-Solver++ 2M, any step count) or ddpm."""
    num_steps: Annotated[int, Field(ge=1, le=1000)] = 50
    """Sampling steps (any count: the timesteps are spaced over the trained process)."""
    eta: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    """DDIM stochasticity (0: deterministic)."""
    batch_size: Annotated[int, Field(ge=1)] = 64
    """Tiles sampled together (the tiles do not depend on it)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast dtype for the UNet and decoder during sampling."""


# ------------------------------------------------------------------------ class guidance
class LatentClassifierCfg(_Section):
    """Noise-aware latent classifier p(y | x_t, t) (guided-diffusion recipe, in latent space)."""

    channels: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = [64, 128, 128]
    """Channels per resolution level of the encoder."""
    layers_per_block: Annotated[int, Field(ge=1)] = 1
    """ResNet blocks per level."""
    attention_resolutions: list[int] = []
    """Latent edge lengths whose level has self-attention (none by default)."""
    attention_head_dim: Annotated[int, Field(ge=1)] = 32
    """Channels per attention head."""
    norm_num_groups: Annotated[int, Field(ge=1)] = 32
    """GroupNorm groups."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    """Dropout in the ResNet blocks (the labeled subsets are small)."""
    train: TrainCfg = TrainCfg(steps=3000, batch_size=64, lr=3e-4, weight_decay=0.05, ema_decay=0.0,
                               warmup_steps=100)
    eval_every: Annotated[int, Field(ge=1)] = 250
    """Evaluate on the valid split (accuracy per noise quartile) every this many steps; keep the best."""
    eval_max: Annotated[int, Field(ge=1)] = 1024
    """Valid latents used per evaluation (stratified, fixed)."""


class FinetuneCfg(_Section):
    """Stage ``finetune``: latent classifier + domain adaptation of the pre-trained UNet."""

    domain_adapt: bool = True
    """Fine-tune the pre-trained UNet (unconditionally) on the labeled subset; off: use it as is."""
    train: TrainCfg = TrainCfg(steps=1000, batch_size=32, lr=5e-5, ema_decay=0.995, warmup_steps=50)
    classifier: LatentClassifierCfg = LatentClassifierCfg()


class ConditionalCfg(_Section):
    """Stage ``conditional``: the baseline the paper argues against — the same UNet
    trained class-conditionally on the labeled subset only, with no pre-training."""

    enabled: bool = False
    """Train the baseline (needed by the 'conditional' source and the fourth arm)."""
    train: TrainCfg = TrainCfg(steps=4000, batch_size=32, lr=2e-4, ema_decay=0.999, warmup_steps=100)


class SynthesizeCfg(_Section):
    """Stage ``synthesize``: class-guided tiles per class."""

    sources: Annotated[list[Literal["guided", "unguided", "conditional"]], Field(min_length=1)] = ["guided"]
    """guided: (domain-adapted) UNet + classifier guidance; unguided: the same UNet with scale 0;
    conditional: the class-conditional baseline (needs conditional.enabled)."""
    per_class: Annotated[int, Field(ge=1)] | None = None
    """Tiles per class; when set it wins over ``multiple_of_real``."""
    multiple_of_real: Annotated[float, Field(gt=0.0)] = 3.0
    """Tiles per class = this x the class's labeled count (the paper tried 0.5, 1 and 3)."""
    guidance_scale: Annotated[float, Field(ge=0.0)] = 3.0
    """Classifier-guidance scale s (0: unguided)."""
    class_scales: dict[str, Annotated[float, Field(ge=0.0)]] = {}
    """Per-class guidance scale overriding ``guidance_scale`` (keys: class names)."""


# ------------------------------------------------------------------- selection, evaluation
class ImageClassifierCfg(_Section):
    """A tile classifier (timm backbone, trained from scratch) for selection and evaluation."""

    backbone: str = "resnet18"
    """timm model name (created with pretrained=False)."""
    steps: Annotated[int, Field(ge=1)] = 600
    """Optimiser steps (cosine learning-rate decay to 0); with ``epochs``, the fewest steps."""
    epochs: Annotated[float, Field(gt=0.0)] | None = None
    """Scale the steps with the training set: ceil(epochs x tiles / batch_size), at least ``steps``
    and at most ``max_steps`` (null: always ``steps``)."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """The most steps ``epochs`` may ask for (null: no cap)."""
    batch_size: Annotated[int, Field(ge=1)] = 64
    """Tiles per step."""
    lr: Annotated[float, Field(gt=0.0, le=1.0)] = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.05
    """AdamW weight decay."""
    warmup_steps: Annotated[int, Field(ge=0)] = 50
    """Linear warm-up steps."""
    eval_every: Annotated[int, Field(ge=1)] = 100
    """Evaluate on the valid split every this many steps; the best (balanced accuracy) is kept."""
    eval_max: Annotated[int, Field(ge=1)] = 1024
    """Valid tiles used for model selection (stratified, fixed)."""
    color_jitter: Annotated[float, Field(ge=0.0, le=0.5)] = 0.1
    """Strength of the brightness/contrast/saturation jitter (flips and 90-degree rotations always on)."""
    class_balanced: bool = True
    """Draw every class equally often in a batch (few-label subsets are often imbalanced)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast dtype for training and inference."""


class SelectCfg(_Section):
    """Stage ``select``: keep the synthetic tiles an auxiliary classifier confidently matches to their class."""

    classifier: ImageClassifierCfg = ImageClassifierCfg()
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    """Keep a tile when the predicted class is its target and the confidence is at least this (tau)."""
    temperature_scaling: bool = True
    """Calibrate the confidence by a temperature fitted on the valid split first."""
    centroid_rule: bool = False
    """Also require the nearest class centroid (of the labeled tiles' features) to be the target."""
    ratio: Annotated[float, Field(gt=0.0)] | None = 1.0
    """At most ratio x (real labeled count) kept tiles per class (the paper tried 0.5, 1 and 3); null: no cap."""


ARMS = ("real", "real+synthetic", "real+selected", "real+conditional_no_pretrain", "ssl", "ssl+selected")


def rung_name(multiple: float | None) -> str:
    """Name of a real-label ladder rung: 2 -> 'real@2x', None -> 'real@all'."""
    return "real@all" if multiple is None else f"real@{multiple:g}x"


class EvaluateCfg(_Section):
    """Stage ``evaluate``: the downstream classifier on each arm, several seeds, test metrics with CIs."""

    classifier: ImageClassifierCfg = ImageClassifierCfg()
    seeds: Annotated[list[Seed], Field(min_length=1)] = [0, 1, 2, 3, 4]
    """One run per seed and arm (at least 5 for the confidence intervals the protocol asks for)."""
    arms: Annotated[list[Literal[ARMS]], Field(min_length=1)] = ["real", "real+synthetic", "real+selected"]  # type: ignore[valid-type]
    """real, real+synthetic (all guided tiles), real+selected, real+conditional_no_pretrain, ssl (the
    backbone pre-trained self-supervised on the pool, fine-tuned on the real subset), ssl+selected."""
    ladder: list[Annotated[float, Field(gt=1.0)]] = []
    """Real-label ladder: real-only arms on nested supersets of the budget's subset with these
    multiples of its labels (arms ``real@2x``...), for the label-equivalent of every other arm."""
    ladder_all: bool = False
    """Also the top rung ``real@all``: the whole train split labeled."""
    arm_seeds: dict[str, Annotated[int, Field(ge=1)]] = {}
    """Run an arm on only the first N of ``seeds`` (e.g. the ladder rungs on 5, the headline arms on
    all 10); keys: arm names (``real@2x``, ``real@all`` for rungs)."""
    cpu_processes: Annotated[int, Field(ge=1)] | None = None
    """On the CPU (Linux), how many trainings run at once, each in its own process with one torch
    thread; unset: one per core; 1: one after another in this process with every thread. On GPUs
    the trainings are shared out among the processes of ``accelerate launch`` instead."""
    reuse_from: list[str] = []
    """Other run directories whose finished trainings (``evaluate/cache``) this evaluation reuses
    when one has exactly the same inputs (tiles, labels, valid and test tiles, recipe, seed,
    backbone, versions): e.g. the real-only arms of the paper and practical protocols of one task."""

    @field_validator("arms")
    @classmethod
    def _real_first(cls, v: list[str]) -> list[str]:
        if "real" not in v:
            raise ValueError("the arms must include 'real' (every gain is measured against it)")
        return v

    def rungs(self) -> list[float | None]:
        """The ladder's multiples, None for ``real@all``."""
        return [*sorted(self.ladder), *([None] if self.ladder_all else [])]

    def all_arms(self) -> list[str]:
        """``arms`` and the ladder rungs, in the order they run (real first)."""
        return [*self.arms, *(rung_name(m) for m in self.rungs())]

    def synthetic(self) -> bool:
        """Whether an arm trains on synthetic tiles (so the evaluation needs synthesis and selection)."""
        return bool(set(self.arms) - {"real", "ssl"})

    def seeds_of(self, arm: str) -> list[int]:
        """The seeds an arm runs on."""
        return self.seeds[: self.arm_seeds.get(arm, len(self.seeds))]

    @model_validator(mode="after")
    def _arm_seeds_known(self) -> EvaluateCfg:
        unknown = sorted(set(self.arm_seeds) - set(self.all_arms()))
        if unknown:
            raise ValueError(f"arm_seeds names {unknown}, which are not arms of this evaluation ({self.all_arms()})")
        return self


# ---------------------------------------------------------------------- generation quality
class FeaturesCfg(_Section):
    """Stage ``features``: the self-supervised (SimCLR) encoder trained on the pool. It is the
    feature space of generation quality and the pre-trained backbone of the ``ssl`` arms."""

    backbone: str = "resnet18"
    """timm backbone (the ``ssl`` arms need the downstream classifier's backbone)."""
    steps: Annotated[int, Field(ge=1)] = 600
    """SimCLR training steps."""
    batch_size: Annotated[int, Field(ge=2)] = 64
    """Tiles per SimCLR step (two augmented views each)."""
    lr: Annotated[float, Field(gt=0.0)] = 1e-3
    """Peak AdamW learning rate (warm-up, then cosine decay to 0)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast dtype of the training step."""


class GenerationCfg(_Section):
    """Stage ``generation``: distances between synthetic and real tiles (in the features stage's encoder)."""

    max_real: Annotated[int, Field(ge=4)] = 2000
    """At most this many real held-out (valid) tiles as the reference set (stratified)."""
    inception_weights: str | None = None
    """Inception-v3 weights (torch-fidelity's .pth); default: the torch hub cache. Missing: column skipped."""
    knn_k: Annotated[int, Field(ge=1)] = 3
    """k of the k-NN manifolds of precision/recall (Kynkaanniemi et al. 2019)."""
    kid_subset_size: Annotated[int, Field(ge=2)] = 500
    """Subset size of the KID estimate (clipped to the smaller set)."""
    near_copy_quantile: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.01
    """A synthetic tile is a near-copy when it is closer to a labeled tile than this quantile of
    real held-out tiles are."""


# --------------------------------------------------------------------------------------- root
class ExperimentConfig(_Section):
    """A whole experiment: data, models and every stage's settings."""

    experiment: str
    """Name of the experiment; the run directory defaults to runs/<experiment>."""
    preset: Literal["tiny", "cpu", "paper"] = "cpu"
    """Model-size preset (tiny: tests, cpu: a 2-core machine, paper: the paper's sizes)."""
    seed: Seed = 0
    """Seed of everything stochastic except the target's split (data.target.split_seed)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where single-process stages run; multi-GPU runs go through ``accelerate launch``."""
    run_dir: str | None = None
    """Run directory; default runs/<experiment> below the current folder."""
    tracking: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Experiment trackers (accelerate's) that receive the training scalars and sample grids beside
    metrics.jsonl; tensorboard writes under RUN_DIR/tracking (pip install 'histodiffusion[tracking]')."""
    data: DataCfg
    autoencoder: AutoencoderCfg = AutoencoderCfg()
    diffusion: DiffusionCfg = DiffusionCfg()
    pretrain: PretrainCfg = PretrainCfg()
    sampling: SamplingCfg = SamplingCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    conditional: ConditionalCfg = ConditionalCfg()
    synthesize: SynthesizeCfg = SynthesizeCfg()
    select: SelectCfg = SelectCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    features: FeaturesCfg = FeaturesCfg()
    generation: GenerationCfg = GenerationCfg()

    @field_validator("experiment")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("letters, digits, '.', '_' and '-' only (it names a folder)")
        return v

    @model_validator(mode="after")
    def _sources_need_their_stage(self) -> ExperimentConfig:
        if "conditional" in self.synthesize.sources and not self.conditional.enabled:
            raise ValueError("synthesize.sources includes 'conditional' but conditional.enabled is false; "
                             "enable the baseline or drop it from the sources")
        needs = {"real+synthetic": "guided", "real+selected": "guided", "ssl+selected": "guided",
                 "real+conditional_no_pretrain": "conditional"}
        for arm in self.evaluate.arms:
            if arm in needs and needs[arm] not in self.synthesize.sources:
                raise ValueError(f"evaluate.arms has '{arm}', which needs '{needs[arm]}' in synthesize.sources")
        ssl = [a for a in self.evaluate.arms if a.startswith("ssl")]
        if ssl and self.features.backbone != self.evaluate.classifier.backbone:
            raise ValueError(f"evaluate.arms has {ssl}, which fine-tune the features stage's backbone: features.backbone "
                             f"({self.features.backbone}) must equal evaluate.classifier.backbone "
                             f"({self.evaluate.classifier.backbone})")
        return self

    def to_dict(self) -> dict:
        """Plain dict of the resolved config (what is written to the run directory)."""
        return self.model_dump(mode="json")

    def section_hash(self, *sections: str, exclude: tuple[str, ...] = ()) -> str:
        """Stable hash of the named sections (dotted paths), leaving out settings that do not change
        results (where the data lives, worker counts, device) and the dotted paths in ``exclude``."""
        full = _drop_keys(self.to_dict(), _NON_SEMANTIC_KEYS)
        for dotted in (*_NON_SEMANTIC, *exclude):
            parent, _, leaf = dotted.rpartition(".")
            node = get_path(full, parent) if parent else full
            node.pop(leaf, None)
        part = {s: get_path(full, s) for s in sections} if sections else full
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ loading
_NON_SEMANTIC = ("data.root", "data.num_workers", "device", "run_dir", "tracking", "evaluate.reuse_from",
                "evaluate.cpu_processes")
# Settings that never change a stage's results (exact resume makes checkpoint cadence irrelevant).
_NON_SEMANTIC_KEYS = frozenset({"time_limit_minutes", "log_every", "checkpoint_every", "keep_checkpoints",
                                "sample_every"})

def _drop_keys(tree: Any, keys: frozenset[str]) -> Any:
    """``tree`` without the keys in ``keys``, wherever they occur."""
    if isinstance(tree, dict):
        return {k: _drop_keys(v, keys) for k, v in tree.items() if k not in keys}
    if isinstance(tree, list):
        return [_drop_keys(v, keys) for v in tree]
    return tree


def get_path(tree: dict, dotted: str) -> Any:
    """The value at a dotted path ("pretrain.train.steps"; list items by index) of a config dict."""
    node: Any = tree
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _glued_keys(value: Any) -> list[str]:
    """Mapping keys like ``a:1`` with no value: YAML's reading of ``{a:1}`` (no space after the colon)."""
    if isinstance(value, dict):
        own = [str(k) for k, v in value.items() if v is None and ":" in str(k)]
        return own + [g for v in value.values() for g in _glued_keys(v)]
    if isinstance(value, list):
        return [g for v in value for g in _glued_keys(v)]
    return []


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``key.sub=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value")
    key, _, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({err})") from err
    glued = _glued_keys(value)
    if glued:
        raise ConfigError(f"--set {assignment!r}: {glued[0]!r} reads as a key with no value; YAML needs a space "
                          f"after the colon (write {{{glued[0].replace(':', ': ', 1)}}})")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not an index of the list")
            node = node[int(part)]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
        else:
            if not isinstance(node.get(part, {}), (dict, list)):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: {last} is not an index of the list")
        node[int(last)] = value
    else:
        node[last] = value


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section class found by walking ``loc`` (field names and list indices) from ``model``."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _find_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list, tuple, Annotated) or origin is not None:
        for arg in typing.get_args(annotation):
            found = _find_model(arg)
            if found is not None:
                return found
    return None


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    """Turn a pydantic error into lines ``source: key.path: what is wrong; what was expected``."""
    lines = []
    seen = set()
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in ("int", "float", "function-before", "function-after"))))
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            msg = f"unknown key{hint or '.'} Allowed here: {', '.join(allowed)}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            msg = f"{e['msg'].removeprefix('Value error, ')} (got {shown})"
        if (path, msg) in seen:
            continue
        seen.add((path, msg))
        lines.append(f"{source}: {path}: {msg}")
    return "invalid config\n  " + "\n  ".join(lines)


def _expand_shorthand(raw: dict) -> dict:
    """Turn ``pool: [ebhi]`` and ``target: pcam`` into mappings so ``--set`` can reach into them."""
    data = raw.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("target"), str):
            data["target"] = {"dataset": data["target"]}
        if isinstance(data.get("pool"), list):
            data["pool"] = [{"dataset": s} if isinstance(s, str) else s for s in data["pool"]]
    return raw


def resolve_raw(raw: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "config") -> dict:
    """Apply ``--set`` overrides, then lay the preset's table under the result."""
    raw = _expand_shorthand(copy.deepcopy(raw))
    for assignment in overrides:
        apply_override(raw, assignment)
    preset = raw.get("preset", "cpu")
    if preset not in PRESETS:
        raise ConfigError(
            f"invalid config\n  {source}: preset: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}"
        )
    return _deep_merge(PRESETS[preset], raw)


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "config") -> ExperimentConfig:
    """Validate a raw mapping (plus overrides and preset) into an :class:`ExperimentConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    merged = resolve_raw(raw, overrides, source)
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, ExperimentConfig)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read, override and validate an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (expected a YAML file such as configs/smoke.yaml)")
    try:
        raw = yaml.safe_load(io.read_text(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    return config_from_dict(raw if raw is not None else {}, overrides, source=str(path))


def describe_keys(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type, description) of every config key, from the field docstrings."""
    rows = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _find_model(field.annotation)
        if sub is not None and typing.get_origin(field.annotation) is not list:
            rows += describe_keys(sub, f"{path}.")
            continue
        rows.append((path, _type_name(field.annotation), " ".join((field.description or "").split())))
    return rows


def _type_name(ann: Any) -> str:
    """A short, readable name of a field's type (for ``histodiffusion config --keys``)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "/".join(str(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))
