#!/usr/bin/env bash
# Makes everything a device call carries, here, in one command. Safe to run again: each part is
# rebuilt or refetched only where it is missing or (for the binary) where the code changed.
#
#   target/device/effdet.xz, target/device/lib/    build.sh (≈ 25 min on a fresh checkout, a few
#                                                  minutes incremental), then xz (carry limit 64 MiB)
#   target/device/data/train-0000i-of-00004.tfrecord   coco_tiny's train split (check.sh's DATA)
#   .whl/                                          fetch_wheels.sh (the PyTorch effdet baseline)
#   target/device/effdet-<commit>.xz               for each commit in BASELINES="c1 c2 …" (optional):
#                                                  that commit built in a git worktree that shares
#                                                  target/cuda, so only the workspace crates rebuild
#
# Usage: tools/device/prepare.sh            then the device call in tools/device/README.md
#        BASELINES="eeed423" tools/device/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DEV=$ROOT/target/device
COCO=${COCO_TINY_DIR:-$ROOT/../shared/data/coco_tiny}

step() { echo "== $*"; }

for commit in ${BASELINES:-}; do
  out=$DEV/effdet-$commit.xz
  if [[ -f $out ]]; then step "baseline $commit: $out exists"; continue; fi
  step "baseline $commit: building in a worktree"
  tree=$ROOT/target/worktree-$commit
  rm -rf "$tree"; git worktree prune
  git worktree add --detach "$tree" "$commit" > /dev/null
  mkdir -p "$tree/target" "$ROOT/target/cuda"
  ln -sfn "$ROOT/target/cuda" "$tree/target/cuda"
  (cd "$tree" && bash tools/device/build.sh)
  mkdir -p "$DEV"
  xz -T2 -6 -c "$tree/target/device/effdet" > "$out.tmp" && mv "$out.tmp" "$out"
  git worktree remove --force "$tree"
done

step "CUDA binary"
bash tools/device/build.sh
xz -T2 -6 -c "$DEV/effdet" > "$DEV/effdet.xz.tmp" && mv "$DEV/effdet.xz.tmp" "$DEV/effdet.xz"

if ! ls "$DEV"/data/train-*-of-00004.tfrecord > /dev/null 2>&1; then
  step "coco_tiny train shards"
  if [[ ! -d $COCO/train2017 ]]; then
    echo "coco_tiny not found at $COCO (set COCO_TINY_DIR)" >&2
    exit 1
  fi
  cargo build --release -q -p effdet-tools --bin create_coco_tfrecord
  mkdir -p "$DEV/data"
  target/release/create_coco_tfrecord --image_dir "$COCO/train2017" \
    --object_annotations_file "$COCO/annotations/instances_train2017.json" \
    --output_file_prefix "$DEV/data/train" --num_shards 4
fi

if ! ls .whl/effdet-0.4.1-*.whl > /dev/null 2>&1; then
  step "PyTorch baseline wheels"
  bash tools/device/fetch_wheels.sh
fi

step "ready to carry"
du -ch "$DEV"/effdet*.xz "$DEV"/lib "$DEV"/data .whl | tail -1
ls "$DEV"/effdet*.xz
