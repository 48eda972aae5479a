#!/usr/bin/env python3
"""Per-kernel GPU time of one training step, ours beside PyTorch effdet's, from the device
check's profiles (check.sh `PROFILE`): Nsight Compute's raw CSV of our step (one row per launch,
`gpu__time_duration.sum`) and torch_baseline.py's `--profile` CSV (name, launches, total_us).

Prints the kernel time per family (depthwise, other convolutions, matrix products, batch norm,
elementwise, ...) for both, then the heaviest kernels and launches of ours: where the step's
device time goes, and against which of PyTorch's figures each family stands.

    kernel_table.py --ours ncu.csv [--torch torch_kernels.csv] [--step-ms MS --torch-step-ms MS]
    kernel_table.py --self-test
"""
import argparse
import csv
import io
import re
import sys

# First match wins; names are matched lower-cased.
FAMILIES = [
    ("depthwise conv", r"^dw_|depthwise"),
    ("other conv", r"conv|fprop|dgrad|wgrad|cudnn|implicit|im2col"),
    ("matrix product", r"gemm|nvjet|cutlass|xmma|cublas|matmul|splitk"),
    ("batch norm", r"^bn_|batch_norm|batchnorm|welford"),
    ("optimizer", r"^mt_|multi_tensor|foreach|axpby|sgd|unscale|non_finite|amp_"),
    ("loss", r"focal|loss|huber|smooth_l1"),
    ("pool / resize", r"pool|upsample|nearest|interp"),
    ("reduction", r"reduce|col_sum|col_sq|sum|mean|norm"),
    ("copy / cast / fill", r"copy|cast|cvt|fill|memset|contiguous|cat_|stack|where|index"),
    ("elementwise", r"elementwise|vectorized|unrolled|affine|badd|bmul|bsub|bdiv|swish|silu"
                    r"|sigmoid|gate|bias|fusion|exp|mul|add|scale"),
]
FAMILY_RES = [(name, re.compile(rx)) for name, rx in FAMILIES]
TIME_UNITS_TO_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3,
                    "ms": 1e3, "second": 1e6, "s": 1e6}


def family(name):
    low = name.lower()
    for fam, rx in FAMILY_RES:
        if rx.search(low):
            return fam
    return "other"


def read_ncu(text):
    """Launches of Nsight Compute's `--csv --page raw` output: (name, grid, block, µs) each."""
    rows = list(csv.reader(io.StringIO(text)))
    header = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if header is None:
        raise ValueError("no 'Kernel Name' column: not an ncu --csv --page raw export")
    cols = rows[header]
    k_name, k_time = cols.index("Kernel Name"), cols.index("gpu__time_duration.sum")
    k_grid = cols.index("Grid Size") if "Grid Size" in cols else None
    k_block = cols.index("Block Size") if "Block Size" in cols else None
    scale = 1e-3  # ncu's base unit for durations is the nanosecond
    launches = []
    for r in rows[header + 1:]:
        if len(r) <= max(k_name, k_time):
            continue
        if not r[0].strip().isdigit():  # the units row
            unit = r[k_time].strip()
            scale = TIME_UNITS_TO_US.get(unit, scale)
            continue
        try:
            t = float(r[k_time].replace(",", "")) * scale
        except ValueError:
            continue
        launches.append((r[k_name], r[k_grid] if k_grid is not None else "",
                         r[k_block] if k_block is not None else "", t))
    return launches


MARKERS = {"phase_end_forward": "backward", "phase_end_backward": "update",
           "phase_end_update": "after the step"}


def by_phase(launches):
    """Our launches split at the phase markers (EFFDET_PHASE_MARKERS=1: empty kernels named
    phase_end_<phase>, launched last in each phase) → [(phase, launches, µs)], markers left out;
    empty when the profile has no markers."""
    if not any(name in MARKERS for name, *_ in launches):
        return []
    phase, out = "forward", {}
    for name, _, _, t in launches:
        if name in MARKERS:
            phase = MARKERS[name]
            continue
        n, s = out.get(phase, (0, 0.0))
        out[phase] = (n + 1, s + t)
    order = ["forward", "backward", "update", "after the step"]
    return [(p, *out[p]) for p in order if p in out]


def read_torch(text):
    """torch_baseline.py --profile CSV → {name: (launches, µs)}."""
    out = {}
    for r in csv.DictReader(io.StringIO(text)):
        n, t = out.get(r["name"], (0, 0.0))
        out[r["name"]] = (n + int(r["launches"]), t + float(r["total_us"]))
    return out


def by_name(launches):
    out = {}
    for name, _, _, t in launches:
        n, s = out.get(name, (0, 0.0))
        out[name] = (n + 1, s + t)
    return out


def by_family(kernels):
    out = {}
    for name, (n, t) in kernels.items():
        f = family(name)
        fn, ft = out.get(f, (0, 0.0))
        out[f] = (fn + n, ft + t)
    return out


def table(ours, torch=None, top=25, step_ms=None, torch_step_ms=None):
    """The printed report (a string). With the step times measured without the profiler, the
    kernel time's share of them: how busy the GPU is (the rest is the host's launch overhead
    and the step's waits)."""
    lines = []
    ok = by_name(ours)
    total_ms = sum(t for _, _, _, t in ours) / 1e3

    def busy(kernel_ms, measured):
        if not measured:
            return ""
        return f" = {100 * kernel_ms / measured:.0f} % of the {measured:.1f} ms step measured unprofiled"

    lines.append(f"ours: {len(ours)} launches, {total_ms:.1f} ms of kernel time in the step"
                 + busy(total_ms, step_ms))
    for phase, n, t in by_phase(ours):
        lines.append(f"  {phase}: {n} launches, {t / 1e3:.1f} ms of kernel time")
    if torch:
        t_ms = sum(t for _, t in torch.values()) / 1e3
        t_n = sum(n for n, _ in torch.values())
        lines.append(f"PyTorch effdet: {t_n} launches, {t_ms:.1f} ms of kernel time in the step"
                     + busy(t_ms, torch_step_ms))
    fo = by_family(ok)
    ft = by_family(torch) if torch else {}
    fams = sorted(set(fo) | set(ft), key=lambda f: -max(fo.get(f, (0, 0))[1], ft.get(f, (0, 0))[1]))
    lines.append("")
    lines.append("%-20s %10s %9s %10s %9s %7s" % ("family", "ours ms", "launches", "torch ms",
                                                  "launches", "ratio"))
    for f in fams:
        on, ot = fo.get(f, (0, 0.0))
        tn, tt = ft.get(f, (0, 0.0))
        ratio = "%.2f" % (ot / tt) if tt > 0 and ot > 0 else "-"
        lines.append("%-20s %10.2f %9d %10s %9s %7s" % (
            f, ot / 1e3, on, "%.2f" % (tt / 1e3) if torch else "-",
            tn if torch else "-", ratio))
    lines.append("")
    lines.append(f"ours, heaviest kernels (of {len(ok)} distinct)")
    lines.append("%-60s %8s %9s %6s" % ("kernel", "launches", "ms", "share"))
    for name, (n, t) in sorted(ok.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append("%-60s %8d %9.2f %5.1f%%" % (name[:60], n, t / 1e3,
                                                  100 * t / 1e3 / max(total_ms, 1e-9)))
    lines.append("")
    lines.append("ours, heaviest single launches (grid / block name the layer)")
    for name, grid, block, t in sorted(ours, key=lambda x: -x[3])[:top // 2]:
        lines.append("  %-44s %-18s %-12s %8.3f ms" % (name[:44], grid, block, t / 1e3))
    if torch:
        lines.append("")
        lines.append(f"PyTorch effdet, heaviest kernels (of {len(torch)} distinct)")
        t_ms = sum(t for _, t in torch.values()) / 1e3
        for name, (n, t) in sorted(torch.items(), key=lambda kv: -kv[1][1])[:top]:
            lines.append("%-60s %8d %9.2f %5.1f%%" % (name[:60], n, t / 1e3,
                                                      100 * t / 1e3 / max(t_ms, 1e-9)))
    return "\n".join(lines)


def self_test():
    ncu = "\n".join([
        '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
        '"Block Size","Grid Size","Device","CC","gpu__time_duration.sum"',
        '"","","","","","","","","","","","nsecond"',
        '"0","1","effdet","h","dw_fwd_k3s1_f16","1","7","(256, 1, 1)","(64, 9, 1)","0","9.0","2,000"',
        '"1","1","effdet","h","dw_fwd_k3s1_f16","1","7","(256, 1, 1)","(64, 9, 1)","0","9.0","1000"',
        '"2","1","effdet","h","nvjet_hsh_128x256","1","7","(384, 1, 1)","(8, 4, 1)","0","9.0","500"',
        '"3","1","effdet","h","bn_apply_f16","1","7","(256, 1, 1)","(512, 1, 1)","0","9.0","250"',
    ])
    launches = read_ncu(ncu)
    assert [round(t, 3) for *_, t in launches] == [2.0, 1.0, 0.5, 0.25], launches
    torch = read_torch("name,launches,total_us\nconv_depthwise2d_forward_kernel,2,6.0\n"
                       "sm90_xmma_gemm_f16f16,1,1.0\nvectorized_elementwise_kernel<add>,3,0.3\n")
    fams = by_family(by_name(launches))
    assert fams == {"depthwise conv": (2, 3.0), "matrix product": (1, 0.5),
                    "batch norm": (1, 0.25)}, fams
    assert by_family(torch)["depthwise conv"] == (2, 6.0)
    assert family("sm90_xmma_fprop_implicit_gemm_f16") == "other conv"
    assert family("ucopy_f16") == "copy / cast / fill"
    marked = launches[:1] + [("phase_end_forward", "", "", 0.0)] + launches[1:3] + [
        ("phase_end_backward", "", "", 0.0)] + launches[3:]
    assert by_phase(marked) == [("forward", 1, 2.0), ("backward", 2, 1.5), ("update", 1, 0.25)]
    assert by_phase(launches) == []
    assert "  backward: 2 launches" in table(marked)
    report = table(launches, torch, top=5, step_ms=0.01)
    assert "depthwise conv" in report and "0.50" in report, report  # ours 3 µs vs torch 6 µs
    assert "= 38 % of the 0.0 ms step" in report, report  # 3.75 µs of kernels in 10 µs
    try:
        read_ncu("a,b\n1,2\n")
        raise AssertionError("a CSV without ncu's columns must be refused")
    except ValueError:
        pass
    print("kernel_table self-test ok")


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ours", help="ncu --csv --page raw export of one effdet step")
    p.add_argument("--torch", help="torch_baseline.py --profile CSV of one PyTorch step")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--step-ms", type=float, help="our step time measured without the profiler")
    p.add_argument("--torch-step-ms", type=float, help="PyTorch's, likewise")
    p.add_argument("--self-test", action="store_true")
    a = p.parse_args(argv)
    if a.self_test:
        self_test()
        return 0
    if not a.ours:
        p.error("--ours is required")
    with open(a.ours) as f:
        ours = read_ncu(f.read())
    torch = None
    if a.torch:
        try:
            with open(a.torch) as f:
                torch = read_torch(f.read())
        except (OSError, KeyError, ValueError) as e:
            print(f"(PyTorch profile unreadable: {e})")
    print(table(ours, torch, a.top, a.step_ms, a.torch_step_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
