#!/usr/bin/env bash
# Fetches, on this networked machine, the wheels the offline GPU machine lacks to import and
# train Ross Wightman's PyTorch `effdet` (the baseline that tools/device/torch_baseline.py times).
#
# The GPU machine already has torch, torchvision, timm, numpy, pyyaml, huggingface_hub and
# safetensors, so only effdet and its remaining runtime imports are shipped (all pinned):
#   effdet                  0.4.1   pure Python
#   omegaconf               2.3.0   pure Python (effdet's config objects)
#   antlr4-python3-runtime  4.9.3   pure Python; omegaconf 2.3 pins 4.9.*, which PyPI has only
#                                   as an sdist, so a wheel is built here
#   pycocotools             2.0.11  cp312-abi3 manylinux; effdet imports it at import time
#                                   (effdet/evaluator.py), matplotlib only lazily
# Output: .whl/ at the repository root (git-ignored), about 0.8 MB.
# On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.whl
mkdir -p "$OUT"

# Python 3.12, CPython, manylinux x86_64: the GPU machine's interpreter.
TARGET=(--python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
BINARY=(effdet==0.4.1 omegaconf==2.3.0 pycocotools==2.0.11)
SDIST=(antlr4-python3-runtime==4.9.3)

python3 -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$OUT" "${BINARY[@]}"

if ! ls "$OUT"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1; then
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$TMP" "${SDIST[@]}"
  # Pure Python, so the wheel built by this machine's interpreter is py3-none-any.
  python3 -m pip wheel -q --no-deps -w "$OUT" "$TMP"/antlr4*
fi

ls -l "$OUT"
du -sh "$OUT"
