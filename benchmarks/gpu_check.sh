#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA GPU; everything it measures lands in
# ${OUT:-reports/gpu_check}:
#   1. the GPU benchmarks of `nox -s perf -- --device cuda` (ResNet-50 full fine-tuning at
#      224 px, bf16, channels_last: data-fed and model-only images/s; ViT-B/16 at 224 px,
#      bf16 with scaled-dot-product attention: full fine-tuning against LoRA, VPT, adapters
#      and BitFit, step time and peak memory) and the input-pipeline
#      benchmarks (images/s per core from JPEG files and from the decoded cache);
#   2. the gpu_check grid (bench/grids/gpu_check.toml: every strategy on the GPU path,
#      offline) through the real runner and MLflow, then its report.
# On the device tool's machine (no network, no MLflow): `bash benchmarks/gpu_wheels.sh` here
# first, then run it there with carry [".whl"]:
#   bash benchmarks/gpu_check.sh
# Keras is not checked there (that machine has no TensorFlow); on your own GPU machine with
# `nox` installed, `nox -s perf -- --device cuda` and `nox -s bench -- gpu_check` do the same.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-reports/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ! $py -c "import mlflow" 2>/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/tlbench-site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/tlbench-site"
fi
status=0
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
    2>&1 | tee "$out/gpu.txt"
$py -m pytest benchmarks -k "gpu or input" --device cuda --benchmark-only -p no:cacheprovider \
    --benchmark-columns=median,min,max,rounds 2>&1 | tee "$out/perf.log" || status=1
cp reports/perf.json "$out/perf.json" 2>/dev/null
export MLFLOW_TRACKING_URI="sqlite:///$PWD/reports/gpu_check.db"
$py -m bench run gpu_check --device cuda 2>&1 | tee "$out/grid.log" || status=1
$py -m bench report gpu_check --out /tmp/tlbench-report --no-log 2>&1 | tee "$out/report.log" \
    || status=1
cp /tmp/tlbench-report/gpu_check/report.md "$out/report.md" 2>/dev/null
exit $status
