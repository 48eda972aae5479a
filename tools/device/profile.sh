#!/usr/bin/env bash
# Per-kernel GPU time of one D0 training step (Nsight Compute, one metric, no replay), after
# the fp32 correctness check. Same carried files as check.sh.
set -uo pipefail
BIN=/tmp/effdet
python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" target/device/effdet.xz "$BIN"
chmod +x "$BIN"
NV=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH="$(find "$NV" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
if [[ -f target/device/lib/libnvjpeg.so.13.xz ]]; then   # nvJPEG for cuda-check's stage checks
  mkdir -p /tmp/effdet_lib
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" \
    target/device/lib/libnvjpeg.so.13.xz /tmp/effdet_lib/libnvjpeg.so.13
  export LD_LIBRARY_PATH="/tmp/effdet_lib:$LD_LIBRARY_PATH"
fi
DATA="target/device/data/train-*.tfrecord"
NVIDIA_TF32_OVERRIDE=0 timeout 60 "$BIN" cuda-check --data "$DATA" --image-size 256 --batch-size 2 | tee "$OUT/cuda_check.json"
B=${B:-16}
timeout -k 5 "${PT:-150}" ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel --launch-count "${LC:-20000}" \
  "$BIN" bench-train --device cuda --data "$DATA" --image-size 512 --batch-size "$B" --steps 1 --warmup 0 \
  --reuse-batch --feed simple > "$OUT/ncu.txt" 2> "$OUT/ncu.err"
echo "ncu rc=$?"; tail -3 "$OUT/ncu.err"; wc -l "$OUT/ncu.txt"
