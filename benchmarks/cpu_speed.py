"""Side-by-side speed of the "cpu" backend and PyTorch's CPU kernels (not collected by pytest).

    python benchmarks/cpu_speed.py [--threads 2] [--reps 40] [--only NAME] [--solo dwops|torch]
    python benchmarks/cpu_speed.py --first-call

Shapes: the motivating block, N=16, C=64, 56x56, float32, 3x3 "same". Both libraries get the same
thread count; each case alternates dwops and torch calls, round by round, so background load hits
both alike; the table gives the median and the min over the rounds. ``--solo`` times one
library alone (both columns then show it), to see how much the two thread pools disturb each
other when they alternate in one process. ``--first-call`` instead
times each op's first call in fresh processes (cache load, or compile when the cache is cold).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np


def _median_min(fn, reps, warm=3):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3, float(np.min(ts)) * 1e3


def _pairwise(fns, reps, warm=3):
    """Alternate the callables round by round; per callable (median ms, min ms)."""
    for f in fns:
        for _ in range(warm):
            f()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for k, f in enumerate(fns):
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return [(float(np.median(t)) * 1e3, float(np.min(t)) * 1e3) for t in ts]


def bandwidth(reps):
    """GB/s of a 64 MiB np.copyto (bytes read + bytes written), median and best."""
    a = np.ones(16 << 20, np.float32)
    b = np.empty_like(a)
    med, best = _median_min(lambda: np.copyto(b, a), reps)
    gb = 2 * a.nbytes / 1e9
    return gb / med * 1e3, gb / best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--first-call", action="store_true")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--solo", choices=("dwops", "torch"), default=None,
                    help="time one library alone (no alternation with the other's thread pool)")
    args = ap.parse_args()
    if args.first_call:
        return first_call()

    import numba
    import torch
    import torch.nn.functional as F

    import dwops

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)  # the BLAS under np.matmul
    except ImportError:
        pass

    N, C, H, W = 16, 64, 56, 56
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W), dtype=np.float32)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    w = rng.standard_normal((C, 1, 3, 3), dtype=np.float32)
    pw = rng.standard_normal((C, C), dtype=np.float32)
    b = rng.standard_normal(C, dtype=np.float32)
    tx = torch.from_numpy(x)
    txl = tx.contiguous(memory_format=torch.channels_last)
    tw, tpw, tb = torch.from_numpy(w), torch.from_numpy(pw).reshape(C, C, 1, 1), torch.from_numpy(b)

    bw_med, bw_best = bandwidth(args.reps)
    act_bytes = x.nbytes
    print(f"threads={args.threads}  copy bandwidth {bw_med:.1f} GB/s (median), "
          f"{bw_best:.1f} (best)")
    print(f"{'case':28s} {'dwops ms':>16s} {'torch ms':>16s} {'torch/dwops':>11s} {'floor ms':>8s}")

    cases = {
        # name: (dwops call, torch call, bytes moved at the floor)
        "depthwise NCHW": (
            lambda: dwops.depthwise_conv2d(x, w, padding="same", backend="cpu"),
            lambda: F.conv2d(tx, tw, padding=1, groups=C),
            2 * act_bytes),
        "depthwise NHWC": (
            lambda: dwops.depthwise_conv2d(xl, w, padding="same", layout="NHWC", backend="cpu"),
            lambda: F.conv2d(txl, tw, padding=1, groups=C),
            2 * act_bytes),
        "block NCHW": (
            lambda: dwops.separable_conv2d(x, w, pw, b, padding="same", dw_activation="relu",
                                           residual=x, backend="cpu"),
            lambda: tx + F.conv2d(F.relu(F.conv2d(tx, tw, padding=1, groups=C)), tpw, tb),
            2 * act_bytes),
        "block NHWC": (
            lambda: dwops.separable_conv2d(xl, w, pw, b, padding="same", dw_activation="relu",
                                           residual=xl, layout="NHWC", backend="cpu"),
            lambda: txl + F.conv2d(F.relu(F.conv2d(txl, tw, padding=1, groups=C)), tpw, tb),
            2 * act_bytes),
        "pointwise NCHW": (
            lambda: dwops.pointwise_conv2d(x, pw, b, backend="cpu"),
            lambda: F.conv2d(tx, tpw, tb),
            2 * act_bytes),
        "pointwise NHWC": (
            lambda: dwops.pointwise_conv2d(xl, pw, b, layout="NHWC", backend="cpu"),
            lambda: F.conv2d(txl, tpw, tb),
            2 * act_bytes),
    }
    with torch.no_grad():
        for name, (f_dw, f_t, nbytes) in cases.items():
            if args.only and args.only not in name:
                continue
            if args.solo:
                fns = [f_dw if args.solo == "dwops" else f_t]
                (dm, dmin), = _pairwise(fns, args.reps)
                tm, tmin = dm, dmin
            else:
                (dm, dmin), (tm, tmin) = _pairwise([f_dw, f_t], args.reps)
            floor = nbytes / (bw_best * 1e9) * 1e3
            print(f"{name:28s} {dm:7.2f} ({dmin:6.2f}) {tm:7.2f} ({tmin:6.2f}) {tm / dm:11.2f} "
                  f"{floor:8.2f}")


_FIRST = """
import time, numpy as np
t0 = time.perf_counter()
import dwops
from dwops import {fn}
t1 = time.perf_counter()
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 8, 10, 10)).astype(np.{dt})
w = rng.standard_normal((8, 1, 3, 3)).astype(np.{dt})
pw = rng.standard_normal((8, 8)).astype(np.{dt})
call = {call}
t2 = time.perf_counter(); call(); t3 = time.perf_counter(); call(); t4 = time.perf_counter()
print(f"{{(t1 - t0) * 1e3:7.1f}} ms import, {{(t3 - t2) * 1e3:9.1f}} ms first call, "
      f"{{(t4 - t3) * 1e3:7.2f}} ms second")
"""


def first_call():
    calls = {
        "depthwise_conv2d": "lambda: depthwise_conv2d(x, w, padding='same', backend='cpu')",
        "separable_conv2d": ("lambda: separable_conv2d(x, w, pw, padding='same', "
                             "dw_activation='relu', residual=x, backend='cpu')"),
    }
    for dt in ("float32", "float64"):
        for fn, call in calls.items():
            out = subprocess.run([sys.executable, "-c", _FIRST.format(fn=fn, dt=dt, call=call)],
                                 capture_output=True, text=True, check=True).stdout.strip()
            print(f"{fn:20s} {dt:8s} {out}")


if __name__ == "__main__":
    main()
