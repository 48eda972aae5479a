#!/usr/bin/env bash
# The GPU device check, run on the lent machine from the repo root with target/device carried
# (the CUDA effdet binary from tools/device/build.sh, coco_tiny shards in target/device/data)
# and .whl carried for the PyTorch baseline (tools/device/fetch_wheels.sh).
#   (a) cuda-check: every own op and the whole D0 loss + gradients, GPU against CPU (fp32), the
#       copy-stream feed against the simple feed, the nvJPEG render kernel against its CPU
#       reference and nvJPEG batches against CPU-decoded ones;
#   (b) bench-train on one reused batch: 512², batch 16/32/64, fp32 (TF32) and mixed precision,
#       gradients from the model's tape; CANDLE runs the same with candle's backward (A/B),
#       UNFUSED with the per-variable optimizer update instead of the multi-tensor one, TRIM with
#       the memory pool trimmed at every synchronization (the driver's default) (A/Bs); BASE runs
#       each carried baseline binary (target/device/effdet-<commit>.xz, built from an earlier
#       commit) on the same machine in the same call, so a change's speed-up is a same-run ratio;
#   (c) bench-train fed by the real pipeline (all CPU cores) with its data-wait share: the simple
#       feed, the copy-stream feed, and the copy-stream feed with nvJPEG decoding;
#   (d) the input pipeline alone on all cores, CPU decode and nvJPEG decode;
#   (e) PyTorch effdet tf_efficientdet_d0 training step, same batch sizes, AMP and fp32;
#   (f) PROFILE=precision:batch: per-kernel GPU time of one step, ours under Nsight Compute (one
#       metric, clocks left alone) and PyTorch's under torch.profiler, side by side by kernel
#       family (tools/device/kernel_table.py; ~1-2 min); phase markers split ours by phase;
#   (g) OPS=precision:batch: one bench-train run with EFFDET_OP_PROFILE=1, each op's host time
#       per step (on a GPU: what enqueueing it costs; the forward is launch-bound, session 5).
# Writes summary.json and results.tgz (every JSON line and log) under $OUT and prints a table
# last. Each step has a timeout so the whole script ends well inside 10 minutes.
set -uo pipefail
FINAL=${OUT:-/tmp/effdet_out}
OUT=/tmp/effdet_work
rm -rf "$OUT"; mkdir -p "$OUT" "$FINAL"
DEV=target/device
BIN=/tmp/effdet
START=$(date +%s)
STEPS=${STEPS:-10}
RUNS=${RUNS:-"fp32:32 fp32:64 fp16:32 fp16:64 bf16:64"}   # bench-train precision:batch
CANDLE=${CANDLE:-fp16:64}                                # with EFFDET_CANDLE_BACKWARD=1 (A/B)
UNFUSED=${UNFUSED:-fp16:64 fp16:32}                      # with EFFDET_UNFUSED_UPDATE=1 (A/B)
TRIM=${TRIM:-fp16:64}                                    # with EFFDET_POOL_TRIM=1 (A/B)
BASE=${BASE:-fp16:64}                                    # with each baseline binary carried
FED=${FED:-fp16:64}                                      # the pipeline-fed run
TORCH=${TORCH:-"fp16:32 fp16:64 fp32:32"}                 # PyTorch effdet precision:batch
PROFILE=${PROFILE:-}                                     # (f) per-kernel profile, e.g. fp16:64
OPS=${OPS:-}                                             # (g) host time per op, e.g. fp16:64

log() { echo "[$(($(date +%s) - START))s] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
nproc | sed 's/^/cpu cores: /' | tee -a "$OUT/gpu.txt"

# The binary travels compressed when large.
if [[ -f $DEV/effdet.xz ]]; then
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$DEV/effdet.xz" "$BIN"
else
  cp "$DEV/effdet" "$BIN"
fi
chmod +x "$BIN"
# Baseline binaries: target/device/effdet-<commit>.xz, each run as /tmp/effdet-<commit>.
BASELINES=()
for f in "$DEV"/effdet-*.xz; do
  [[ -f $f ]] || continue
  tag=$(basename "$f" .xz); tag=${tag#effdet-}
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$f" "/tmp/effdet-$tag"
  chmod +x "/tmp/effdet-$tag"; BASELINES+=("$tag")
done
log "baseline binaries: ${BASELINES[*]:-none}"

# CUDA libraries: those of the machine's PyTorch install (CUDA 13 wheels), the driver's libcuda.
NV=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])" 2>/dev/null)
LIBS=$(find "$NV" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
# nvJPEG (loaded at run time by the nvjpeg feature) comes with the binary.
if [[ -f $DEV/lib/libnvjpeg.so.13.xz ]]; then
  mkdir -p /tmp/effdet_lib
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" \
    "$DEV/lib/libnvjpeg.so.13.xz" /tmp/effdet_lib/libnvjpeg.so.13
  export LD_LIBRARY_PATH="/tmp/effdet_lib:$LD_LIBRARY_PATH"
fi
if ! ldd "$BIN" | tee "$OUT/ldd.txt" | grep -q "not found"; then log "all libraries found"; else
  log "missing libraries:"; grep "not found" "$OUT/ldd.txt"; fi

DATA="$DEV/data/train-*.tfrecord"
run() { # name timeout cmd...
  local name=$1 t=$2; shift 2
  log "$name: $*"
  timeout -k 5 "$t" "$@" > "$OUT/$name.json" 2> "$OUT/$name.err"
  local rc=$?
  tail -c 600 "$OUT/$name.err" | grep -v "^\s*$" | tail -3
  cat "$OUT/$name.json"
  [[ $rc -ne 0 ]] && log "$name exited $rc"
  return 0
}

# (a) correctness, full fp32 (no TF32 anywhere).
NVIDIA_TF32_OVERRIDE=0 run cuda_check 150 "$BIN" cuda-check --data "$DATA" --image-size 256 --batch-size 2
# CHECK_CANDLE=1: the same with candle's backward on both devices (is a gradient difference the
# tape's or the model's own rounding noise?).
if [[ ${CHECK_CANDLE:-0} == 1 ]]; then
  EFFDET_CANDLE_BACKWARD=1 NVIDIA_TF32_OVERRIDE=0 run cuda_check_candle_backward 150 "$BIN" cuda-check \
    --data "$DATA" --image-size 256 --batch-size 2
fi

# (b) model alone on a reused batch: precision:batch pairs (simple feed: the model's figures do not
# depend on the copy-stream code, which (a) and (c) check).
bench_model() { # name-prefix precision:batch [VAR=value for this run only]
  local name=$1 pb=$2 p b
  p=${pb%%:*}; b=${pb##*:}
  [[ -n ${3:-} ]] && local -x "$3"
  run "${name}_${p}_b${b}" "${RT:-100}" "${BENCH_BIN:-$BIN}" bench-train --device cuda --data "$DATA" --image-size 512 \
    --batch-size "$b" --steps "$STEPS" --warmup 3 --precision "$p" --reuse-batch --feed simple
}
for pb in $RUNS; do bench_model train "$pb"; done
for pb in $CANDLE; do bench_model train_candle_backward "$pb" EFFDET_CANDLE_BACKWARD=1; done
for pb in $UNFUSED; do bench_model train_unfused_update "$pb" EFFDET_UNFUSED_UPDATE=1; done
for pb in $TRIM; do bench_model train_pool_trim "$pb" EFFDET_POOL_TRIM=1; done
for pb in $OPS; do bench_model train_op_profile "$pb" EFFDET_OP_PROFILE=1; done
for tag in "${BASELINES[@]}"; do
  for pb in $BASE; do BENCH_BIN=/tmp/effdet-$tag bench_model "train_baseline_$tag" "$pb"; done
done

# (c) fed by the pipeline on all cores: simple feed, copy stream, copy stream + nvJPEG.
p=${FED%%:*}; b=${FED##*:}
dt=f32; [[ $p != fp32 ]] && dt=f16   # mixed precision: images travel as f16
for feed in ${FEEDS:-simple copy-stream nvjpeg}; do
  extra=(--feed "$feed"); [[ $feed == nvjpeg ]] && extra=(--feed copy-stream --gpu-decode)
  run "train_pipeline_${feed}_${p}_b${b}" "${RT:-120}" "$BIN" bench-train --device cuda --data "$DATA" \
    --image-size 512 --batch-size "$b" --steps "$STEPS" --warmup 3 --precision "$p" --threads "$(nproc)" \
    --image-dtype "$dt" "${extra[@]}"
done

# (d) the pipeline alone: CPU decode, then nvJPEG decode + GPU render (workers only label).
run pipeline_b32 60 "$BIN" bench-pipeline --data "$DATA" --mode train --batch-size 32 --image-size 512 \
  --batches 40 --threads "$(nproc)"
run pipeline_nvjpeg_b32 60 "$BIN" bench-pipeline --data "$DATA" --mode train --batch-size 32 --image-size 512 \
  --batches 40 --threads "$(nproc)" --gpu-decode

# (e) PyTorch effdet, same shapes, random inputs.
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 && export PYTHONPATH=/tmp/site
  for pb in $TORCH; do
    p=${pb%%:*}; b=${pb##*:}
    amp=""; [[ $p == fp16 ]] && amp=--amp
    run "torch_${p}_b${b}" "${RT:-120}" python3 tools/device/torch_baseline.py --device cuda --batch-size "$b" \
      --image-size 512 --steps "$STEPS" --warmup 3 $amp --timeout 110
  done
else
  log "no .whl folder: PyTorch baseline skipped"
fi

# (f) where a step's device time goes, per kernel: ours under Nsight Compute (gpu__time_duration
# only, so no replay; --clock-control none leaves the GPU's clocks alone), one step from the start
# (warm-up 0: the first step's few one-time casts are in it); PyTorch's one step after its warm-up.
if [[ -n $PROFILE ]]; then
  p=${PROFILE%%:*}; b=${PROFILE##*:}
  NCU=$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | tail -1)
  if [[ -n $NCU ]]; then
    log "profile_${p}_b${b}: $NCU"
    EFFDET_PHASE_MARKERS=1 timeout -k 5 "${PT:-150}" "$NCU" --clock-control none --metrics gpu__time_duration.sum -f \
      -o "$OUT/profile_${p}_b${b}" "$BIN" bench-train --device cuda --data "$DATA" --image-size 512 \
      --batch-size "$b" --steps 1 --warmup 0 --precision "$p" --reuse-batch --feed simple \
      > "$OUT/profile_run.out" 2> "$OUT/profile_run.err"
    log "ncu exited $?"; tail -3 "$OUT/profile_run.err"
    "$NCU" -i "$OUT/profile_${p}_b${b}.ncu-rep" --csv --page raw --print-units base \
      > "$OUT/profile_${p}_b${b}.csv" 2>> "$OUT/profile_run.err"
  else
    log "no ncu on this machine: our kernel profile skipped"
  fi
  if [[ -n ${PYTHONPATH:-} ]]; then
    amp=""; [[ $p == fp16 ]] && amp=--amp
    timeout -k 5 "${RT:-120}" python3 tools/device/torch_baseline.py --device cuda --batch-size "$b" \
      --image-size 512 --steps 2 --warmup 3 $amp --timeout 110 --profile "$OUT/profile_torch_${p}_b${b}.csv" \
      > "$OUT/profile_torch_run.out" 2> "$OUT/profile_torch_run.err"
    tail -c 300 "$OUT/profile_torch_run.out"
  fi
  if [[ -s $OUT/profile_${p}_b${b}.csv ]]; then
    extra=(); [[ -s $OUT/profile_torch_${p}_b${b}.csv ]] && extra=(--torch "$OUT/profile_torch_${p}_b${b}.csv")
    # The unprofiled step times of (b) and (e), for the GPU-busy share.
    for pair in "step-ms train_${p}_b${b}" "torch-step-ms torch_${p}_b${b}"; do
      ms=$(python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['step_ms'])" \
        "$OUT/${pair#* }.json" 2>/dev/null) && extra+=(--"${pair%% *}" "$ms")
    done
    python3 tools/device/kernel_table.py --ours "$OUT/profile_${p}_b${b}.csv" "${extra[@]}" \
      > "$OUT/kernels_${p}_b${b}.txt" 2>&1
  fi
fi

# Summary: every JSON result in one file, then a table.
python3 - "$OUT" <<'PY'
import json, os, sys, glob
out = sys.argv[1]
summary = {}
for f in sorted(glob.glob(os.path.join(out, "*.json"))):
    name = os.path.basename(f)[:-5]
    if name == "summary":
        continue
    try:
        text = open(f).read().strip().splitlines()
        summary[name] = json.loads(text[-1]) if text else None
    except Exception as e:
        summary[name] = {"error": f"unreadable: {e}"}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print("\n%-36s %10s %9s %9s %8s %9s" % ("run", "img/s", "step ms", "wait ms", "wait %", "mem MiB"))
for k, v in summary.items():
    if not isinstance(v, dict) or "images_per_sec" not in v:
        continue
    mem = v.get("gpu_peak_mb") or v.get("gpu_mem_mb")
    print("%-36s %10.1f %9.1f %9s %8s %9s" % (
        k, v["images_per_sec"], v.get("step_ms", float("nan")),
        "%.1f" % v["data_wait_ms"] if "data_wait_ms" in v else "-",
        "%.1f" % (100 * v["data_wait_share"]) if "data_wait_share" in v else "-",
        "%.0f" % mem if mem else "-"))
print("\nstep phases, ms (queued / total; queued ≈ total: launch-bound)")
for k, v in summary.items():
    ph = v.get("phases_ms") if isinstance(v, dict) else None
    if ph:
        tn = v.get("tensors_per_step") or {}
        print("  %-34s fwd %7.1f / %7.1f  bwd %7.1f / %7.1f  update queued %6.1f  tensors %s/%s/%s" % (
            k, ph["forward_queued"], ph["forward"], ph["backward_queued"], ph["backward"],
            ph["update_queued"], tn.get("forward", "-"), tn.get("backward", "-"), tn.get("update", "-")))
for k, v in summary.items():
    rows = v.get("op_profile") if isinstance(v, dict) else None
    if rows:
        print("\n%s: host ms per step by op (top 16 of %d)" % (k, len(rows)))
        for r in rows[:16]:
            print("  %-28s %-9s %6.0f calls %8.2f ms" % (r["op"], r["pass"], r["calls_per_step"], r["ms_per_step"]))
c = summary.get("cuda_check")
if isinstance(c, dict) and "checks" in c:
    print("\ncuda-check pass=%s (tolerance %g)" % (c["pass"], c["tolerance"]))
    for ch in c["checks"]:
        print("  %-45s out %.2e grad %.2e %s" % (ch["name"], ch["output"], ch["gradients"], "ok" if ch["pass"] else "FAIL " + str(ch.get("worst"))))
    for h in c.get("host_costs") or []:
        print("  host cost %-38s enqueue %6.2f µs/op, completed %6.2f µs/op" % (h["op"], h["enqueue_us"], h["completed_us"]))
g = summary.get("pipeline_nvjpeg_b32")
if isinstance(g, dict) and isinstance(g.get("gpu_decode"), dict):
    d = g["gpu_decode"]
    print("\nnvJPEG %s: stage %.0f img/s, decoders %s, hardware note: %s" % (
        d.get("nvjpeg_version"), d.get("gpu_stage_images_per_sec", 0), d.get("counts"), d.get("hardware_unavailable")))
PY
for k in "$OUT"/kernels_*.txt; do
  [[ -f $k ]] || continue
  echo; echo "== $(basename "$k") (whole table in results.tgz)"; head -40 "$k"; cp "$k" "$FINAL/"
done
cp "$OUT/summary.json" "$FINAL/summary.json"
tar czf "$FINAL/results.tgz" -C "$OUT" .
log "done"
