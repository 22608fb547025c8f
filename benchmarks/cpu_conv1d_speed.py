"""Depthwise 1-d convolution: the "cpu" backend against PyTorch's CPU kernels (not collected by
pytest).

    python benchmarks/cpu_conv1d_speed.py [--threads 2] [--reps 30] [--only NAME]

Shapes: a Mamba-style short causal convolution sized for a CPU, N=2, C=1024, L=2048, K=4,
float32 and bfloat16, NCL and NLC. Forward: ``depthwise_conv1d(x, w, b, padding="causal")``
against ``F.conv1d(x, w, b, padding=K-1, groups=C)[..., :L]`` (NLC: the same on
``x.transpose(1, 2)``, the result transposed back). Backward (grad_input, grad_weight,
grad_bias in one call): ``depthwise_conv1d_backward(..., need_bias=True)`` against
``torch.ops.aten.convolution_backward`` on the left-padded input (the padding is made outside
the timed call). dwops and torch calls alternate round by round (``_pairwise`` of
cpu_speed.py); the table gives median and min over the rounds, and the floor: the bytes a call
must move (read x / grad_output, write y / grad_input) over the best copy bandwidth.
"""

from __future__ import annotations

import argparse

import numpy as np

from cpu_speed import _pairwise, bandwidth


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--N", type=int, default=2)
    ap.add_argument("--C", type=int, default=1024)
    ap.add_argument("--L", type=int, default=2048)
    ap.add_argument("--K", type=int, default=4)
    args = ap.parse_args()

    import ml_dtypes
    import numba
    import torch
    import torch.nn.functional as F

    import dwops

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    N, C, L, K = args.N, args.C, args.L, args.K
    rng = np.random.default_rng(0)
    bw_med, bw_best = bandwidth(args.reps)
    print(f"threads={args.threads}  N={N} C={C} L={L} K={K}  copy bandwidth {bw_med:.1f} GB/s "
          f"(median), {bw_best:.1f} (best)")
    print(f"{'case':26s} {'dwops ms':>16s} {'torch ms':>16s} {'torch/dwops':>11s} "
          f"{'floor ms':>8s}")
    for dtype, tdt, npdt in (("float32", torch.float32, np.float32),
                             ("bfloat16", torch.bfloat16, ml_dtypes.bfloat16)):
        x = rng.uniform(-1, 1, (N, C, L)).astype(npdt)
        gy = rng.uniform(-1, 1, (N, C, L)).astype(npdt)
        w = rng.uniform(-1, 1, (C, 1, K)).astype(npdt)
        b = rng.uniform(-1, 1, (C,)).astype(npdt)
        xl, gyl = (np.ascontiguousarray(a.transpose(0, 2, 1)) for a in (x, gy))

        def t(a):
            return torch.from_numpy(a.view(np.int16)).view(tdt) if dtype == "bfloat16" \
                else torch.from_numpy(a)

        tx, tgy, tw, tb, txl, tgyl = map(t, (x, gy, w, b, xl, gyl))
        txp = F.pad(tx, (K - 1, 0))
        txlp = F.pad(txl.transpose(1, 2), (K - 1, 0))

        def torch_bwd(g, xp):
            return torch.ops.aten.convolution_backward(
                g, xp, tw, [C], [1], [0], [1], False, [0], C, [True, True, True])

        one = x.nbytes
        cases = {
            "forward NCL": (
                lambda: dwops.depthwise_conv1d(x, w, b, padding="causal", backend="cpu"),
                lambda: F.conv1d(tx, tw, tb, padding=K - 1, groups=C)[..., :L], 2 * one),
            "forward NLC": (
                lambda: dwops.depthwise_conv1d(xl, w, b, padding="causal", layout="NLC",
                                               backend="cpu"),
                lambda: F.conv1d(txl.transpose(1, 2), tw, tb, padding=K - 1,
                                 groups=C)[..., :L].transpose(1, 2), 2 * one),
            "backward NCL": (
                lambda: dwops.depthwise_conv1d_backward(x, gy, w, padding="causal",
                                                        need_bias=True, backend="cpu"),
                lambda: torch_bwd(tgy, txp), 3 * one),
            "backward NLC": (
                lambda: dwops.depthwise_conv1d_backward(xl, gyl, w, padding="causal",
                                                        layout="NLC", need_bias=True,
                                                        backend="cpu"),
                lambda: torch_bwd(tgyl.transpose(1, 2), txlp), 3 * one),
        }
        with torch.no_grad():
            for name, (f_dw, f_t, nbytes) in cases.items():
                name = f"{name} {dtype}"
                if args.only and args.only not in name:
                    continue
                (dm, dmin), (tm, tmin) = _pairwise([f_dw, f_t], args.reps)
                floor = nbytes / (bw_best * 1e9) * 1e3
                print(f"{name:26s} {dm:7.2f} ({dmin:6.2f}) {tm:7.2f} ({tmin:6.2f}) "
                      f"{tm / dm:11.2f} {floor:8.2f}")


if __name__ == "__main__":
    main()
