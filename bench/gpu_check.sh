#!/usr/bin/env bash
# The cpu profile's LDM pre-training on one GPU, with bf16 autocast, through `accelerate launch`.
#
# Inputs (prepared on the CPU machine, both ignored by git, carried to the GPU one):
#   .gpu/run/   a protocol run's data manifests, autoencoder and latent cache, so pre-training
#               starts from the same latents:  S=runs/pcam-fewlabel R=.gpu/run
#               mkdir -p $R/data && cp $S/data/{DONE,STATE.json,pool.csv,classes.json,counts.json} $R/data/
#               cp -r $S/autoencoder $S/latents $R/   (autoencoder/checkpoints may be left out)
#   .whl/       wheels of what the GPU image lacks (diffusers, pydantic, pydantic_core, typer,
#               annotated_types, typing_inspection, importlib_metadata, typing_extensions)
# Without a time limit (the preset's full 4000 steps): PROFILE_MINUTES=60 PROFILE_LIMIT=600.
# Output under $OUT: gpu_check.log, phases.txt, and what `bench/gpu_check.py measure` writes.
#
# Runs:  profile  the cpu preset as is (4000 steps of 64, bf16)
#        batch256 the same with batches of 256 (4x the latents per step; the GPU's cheap direction)
#        big      only with BIG_MINUTES=N: a larger UNet (BIG_SET, default 128,256,256,512 channels,
#                 two blocks per level, attention at 8x8 and 4x4: 70.1M parameters, 16x the preset)
#                 at batch 256 for N minutes. SKIP_PROFILE=1 leaves out profile and batch256, so
#                 one lease can go to it: SKIP_PROFILE=1 BIG_MINUTES=7 MEASURE_ARGS="--num-samples 768"
# CONFIG (default configs/pcam-fewlabel.yaml) must be the config .gpu/run was made with.
# Each run is time-limited (train.time_limit_minutes) so the whole script fits one device lease.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HISTODIFFUSION_DATA=/nonexistent
if [ -d .whl ] && [ -z "${NO_WHEELS:-}" ]; then  # NO_WHEELS=1: use the installed packages
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not found"
python3 -c "import torch, diffusers, accelerate; c = torch.cuda.is_available(); print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'gpu', c and torch.cuda.get_device_name(0), 'bf16', c and torch.cuda.is_bf16_supported(), \
'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)" || exit 1

phase() {  # phase NAME SECONDS COMMAND...: time-boxed, logged, never fatal to the rest
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "$limit" "$@"; local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/phases.txt"
}

CONFIG=${CONFIG:-configs/pcam-fewlabel.yaml}
LAUNCH=(accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no
        -m histodiffusion pretrain "$CONFIG")
RUNS=()
if [ -z "${SKIP_PROFILE:-}" ]; then
  for run in profile batch256; do rm -rf "/tmp/$run"; cp -r .gpu/run "/tmp/$run"; RUNS+=("/tmp/$run"); done
  phase profile "${PROFILE_LIMIT:-230}" "${LAUNCH[@]}" --run-dir /tmp/profile \
    --set pretrain.train.time_limit_minutes="${PROFILE_MINUTES:-2.8}"
  phase batch256 "${BATCH256_LIMIT:-230}" "${LAUNCH[@]}" --run-dir /tmp/batch256 \
    --set pretrain.train.batch_size=256 --set pretrain.train.time_limit_minutes="${BATCH256_MINUTES:-2.8}"
fi
if [ "${BIG_MINUTES:-0}" != 0 ]; then
  rm -rf /tmp/big; cp -r .gpu/run /tmp/big; RUNS+=(/tmp/big)
  # shellcheck disable=SC2086  # BIG_SET is a list of --set options
  phase big "${BIG_LIMIT:-600}" "${LAUNCH[@]}" --run-dir /tmp/big --set pretrain.train.batch_size=256 \
    ${BIG_SET:---set pretrain.unet.channels=[128,256,256,512] --set pretrain.unet.layers_per_block=2 \
      --set pretrain.unet.attention_resolutions=[8,4] --set pretrain.train.checkpoint_every=2000} \
    --set pretrain.train.steps=1000000 --set pretrain.sample_every=0 --set pretrain.train.time_limit_minutes="$BIG_MINUTES"
fi
[ ${#RUNS[@]} -gt 0 ] || { echo "nothing to run: SKIP_PROFILE is set and BIG_MINUTES is 0"; exit 1; }
# shellcheck disable=SC2086  # MEASURE_ARGS is a list of options
phase measure "${MEASURE_LIMIT:-150}" python3 bench/gpu_check.py measure --config "$CONFIG" --runs "${RUNS[@]}" \
  --out "$OUT" ${MEASURE_ARGS:-}
ls -la "$OUT"
