#!/usr/bin/env python3
"""Times one training step of Ross Wightman's PyTorch `effdet` (tf_efficientdet_d0) as the
baseline our GPU images/s is quoted against. Development tool only: the project never needs it.

The step is what effdet's own train.py does per batch: forward through DetBenchTrain (model +
focal/huber loss), backward, gradient-norm clipping, SGD with momentum (optionally AMP with a
GradScaler). Images and targets are random and stay resident on the device, so data loading is
not timed. Anchor labels are, by default, computed once up front the way effdet's loader collate
does it on CPU workers (`--labeler loader`, effdet's default); `--labeler bench` labels inside
the timed step on the device instead (effdet's `--bench-labeler`).

Prints exactly one JSON line on stdout, also on failure (then with an "error" key, exit code 2);
a SIGALRM watchdog (`--timeout`) turns a stuck run into such a line instead of a hang.
"""
import argparse
import json
import math
import os
import platform
import signal
import sys
import time
import traceback

MAX_INSTANCES = 100  # effdet's loader pads every image's boxes to this many


class BadArguments(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # Raised instead of argparse's exit so that a bad command line still yields the JSON line.
        raise BadArguments(message)


def parse_args(argv):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before timing")
    p.add_argument("--amp", action="store_true",
                   help="torch.autocast (fp16 + GradScaler on cuda, bf16 on cpu)")
    p.add_argument("--no-tf32", action="store_true", help="fp32 mode without TF32 on cuda")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--labeler", default="loader", choices=["loader", "bench"],
                   help="where anchor labels are made: once up front (loader) or in the step (bench)")
    p.add_argument("--boxes", type=int, default=8, help="ground-truth boxes per image")
    p.add_argument("--num-classes", type=int, default=90)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=4e-5)
    p.add_argument("--clip-grad", type=float, default=10.0, help="global grad-norm clip, 0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=480, help="seconds before giving up, 0 = never")
    p.add_argument("--profile", metavar="CSV",
                   help="after timing, profile one more step (torch.profiler) and write its GPU "
                        "kernels to CSV: name,launches,total_us (tools/device/kernel_table.py)")
    a = p.parse_args(argv)
    for name in ("batch_size", "image_size", "steps", "boxes", "num_classes"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.image_size % 128 != 0:
        p.error("--image-size must be a multiple of 128 (EfficientDet's P7 stride)")
    return a


class Watchdog(Exception):
    pass


def _alarm(signum, frame):
    raise Watchdog("timed out (--timeout); the run was abandoned")


def random_boxes(torch, gen, n, size):
    """n boxes inside a size×size image, yxyx pixels (effdet's loader convention), sides 16..size/2."""
    hw = torch.empty(n, 2).uniform_(16.0, size / 2, generator=gen)
    y0 = torch.rand(n, generator=gen) * (size - hw[:, 0])
    x0 = torch.rand(n, generator=gen) * (size - hw[:, 1])
    return torch.stack([y0, x0, y0 + hw[:, 0], x0 + hw[:, 1]], dim=1)


def make_targets(torch, bench, args, device):
    gen = torch.Generator().manual_seed(args.seed)
    b, n, s = args.batch_size, min(args.boxes, MAX_INSTANCES), args.image_size
    boxes = [random_boxes(torch, gen, n, s) for _ in range(b)]
    # Classes start at 1 in effdet's targets; -1 marks padding.
    classes = [torch.randint(1, args.num_classes + 1, (n,), generator=gen).float() for _ in range(b)]
    target = {
        "img_scale": torch.ones(b),
        "img_size": torch.full((b, 2), float(s)),
    }
    if args.labeler == "bench":
        bbox = torch.full((b, MAX_INSTANCES, 4), -1.0)
        cls = torch.full((b, MAX_INSTANCES), -1.0)
        for i in range(b):
            bbox[i, :n] = boxes[i]
            cls[i, :n] = classes[i]
        target.update(bbox=bbox, cls=cls)
    else:
        # What effdet's DetectionFastCollate does per image on the loader workers.
        from effdet.anchors import Anchors, AnchorLabeler
        labeler = AnchorLabeler(Anchors.from_config(bench.config), args.num_classes, match_threshold=0.5)
        per_image = [labeler.label_anchors(boxes[i], classes[i], filter_valid=False) for i in range(b)]
        for lvl in range(len(per_image[0][0])):
            target[f"label_cls_{lvl}"] = torch.stack([p[0][lvl] for p in per_image]).long()
            target[f"label_bbox_{lvl}"] = torch.stack([p[1][lvl] for p in per_image]).float()
        target["label_num_positives"] = torch.stack([torch.as_tensor(p[2]).float() for p in per_image])
    return {k: v.to(device) for k, v in target.items()}


def run(args, result):
    import torch

    result["torch"] = torch.__version__
    import timm
    result["timm"] = timm.__version__
    import effdet
    result["effdet"] = getattr(effdet, "__version__", None) or _dist_version("effdet")

    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        device = torch.device("cuda")
        result["device"] = torch.cuda.get_device_name(0)
        torch.backends.cudnn.benchmark = True  # effdet's train.py sets this too
        tf32 = not args.amp and not args.no_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        result["tf32"] = tf32
    else:
        device = torch.device("cpu")
        result["device"] = f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"
        result["tf32"] = False
    if args.amp:
        amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        result["precision"] = "fp16" if amp_dtype == torch.float16 else "bf16"
    else:
        amp_dtype = None
        result["precision"] = "fp32"

    torch.manual_seed(args.seed)
    bench = effdet.create_model(
        "tf_efficientdet_d0",
        bench_task="train",
        num_classes=args.num_classes,
        pretrained=False,
        pretrained_backbone=False,  # the GPU machine is offline; weights do not change the timing
        image_size=(args.image_size, args.image_size),
        bench_labeler=args.labeler == "bench",
    )
    bench.train().to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if args.channels_last:
        bench.to(memory_format=memory_format)
    result["params_m"] = round(sum(p.numel() for p in bench.parameters()) / 1e6, 3)

    images = torch.randn(
        args.batch_size, 3, args.image_size, args.image_size,
        generator=torch.Generator().manual_seed(args.seed + 1),
    ).to(device).contiguous(memory_format=memory_format)
    target = make_targets(torch, bench, args, device)

    optimizer = torch.optim.SGD(bench.parameters(), lr=args.lr, momentum=0.9,
                                weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    model = bench  # eager, as effdet's train.py runs it

    def autocast():
        return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # Host time per phase, summed over the timed steps; on a CPU it is the phases' run time
    # (reported as phases_ms, beside bench-train's), on a GPU only enqueueing (not reported).
    phase_sums = {"forward": 0.0, "backward": 0.0, "update": 0.0}
    timing = {"on": False}

    def step():
        t0 = time.perf_counter()
        with autocast():
            loss = model(images, target)["loss"]
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            t2 = time.perf_counter()
            if args.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(bench.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            t2 = time.perf_counter()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(bench.parameters(), args.clip_grad)
            optimizer.step()
        if timing["on"]:
            t3 = time.perf_counter()
            phase_sums["forward"] += t1 - t0
            phase_sums["backward"] += t2 - t1
            phase_sums["update"] += t3 - t2
        return loss.detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = step()
    for _ in range(max(args.warmup - 1, 0)):
        step()
    sync()
    timing["on"] = True
    t0 = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    sync()
    elapsed = time.perf_counter() - t0
    timing["on"] = False
    if device.type == "cpu":
        result["phases_ms"] = {k: round(1000.0 * v / args.steps, 3) for k, v in phase_sums.items()}

    if args.profile and device.type == "cuda":
        try:  # the profile is extra: its failure must not lose the timing above
            result["profiled_kernels"] = profile_one_step(torch, step, sync, args.profile)
        except Exception as e:  # noqa: BLE001
            result["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"

    loss_first, loss_last = float(first), float(last)
    if not (math.isfinite(loss_first) and math.isfinite(loss_last)):
        raise RuntimeError(f"non-finite loss (first {loss_first}, last {loss_last})")
    result.update(
        images_per_sec=round(args.batch_size * args.steps / elapsed, 3),
        step_ms=round(1000.0 * elapsed / args.steps, 3),
        gpu_mem_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        loss_first=round(loss_first, 5),
        loss_last=round(loss_last, 5),
    )


def profile_one_step(torch, step, sync, csv_path):
    """One step under torch.profiler; its GPU kernels summed by name into `csv_path`. Returns
    the number of kernel launches seen."""
    import csv
    import tempfile
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        sync()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f).get("traceEvents", [])
    kernels = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            n, t = kernels.get(e["name"], (0, 0.0))
            kernels[e["name"]] = (n + 1, t + float(e.get("dur", 0.0)))
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "launches", "total_us"])
        for name, (n, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
            w.writerow([name, n, round(t, 3)])
    return sum(n for n, _ in kernels.values())


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except BadArguments as e:
        print(json.dumps({"framework": "pytorch-effdet", "model": "tf_efficientdet_d0",
                          "error": f"bad arguments: {e}"}), flush=True)
        return 2
    result = {
        "framework": "pytorch-effdet",
        "model": "tf_efficientdet_d0",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "precision": ("fp16" if args.device == "cuda" else "bf16") if args.amp else "fp32",
        "images_per_sec": None,
        "step_ms": None,
        "gpu_mem_mb": None,
        "torch": None,
        "timm": None,
        "effdet": None,
        "device": None,
        "tf32": None,
        "channels_last": args.channels_last,
        "labeler": args.labeler,
        "boxes_per_image": args.boxes,
        "clip_grad": args.clip_grad,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    if args.timeout > 0:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(args.timeout)
    code = 0
    try:
        run(args, result)
    except BaseException as e:  # noqa: BLE001 - every failure must still yield the JSON line
        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        msg = (str(e).strip().splitlines() or [""])[0][:500]
        result["error"] = ("oom" if oom else type(e).__name__) + (f": {msg}" if msg else "")
        traceback.print_exc(file=sys.stderr)
        code = 2
    finally:
        signal.alarm(0)
    try:
        import torch
        if result.get("error", "").startswith("oom") and torch.cuda.is_available():
            result["gpu_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except Exception:
        pass
    print(json.dumps(result), flush=True)
    if code:
        # Skip interpreter teardown: after a failure, worker threads (e.g. a busy CUDA or compile
        # worker) can keep a normal exit waiting forever.
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
