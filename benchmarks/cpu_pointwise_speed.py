"""The 1x1 layers of MobileNetV2, EfficientNet-B0 and ConvNeXt-T: "cpu" backend vs PyTorch CPU.

    python benchmarks/cpu_pointwise_speed.py [--threads 2] [--batch 8] [--reps 15]
        [--layout NCHW,NHWC] [--only TEXT] [--direction forward,grad_input,grad_weight]

Not collected by pytest. Every distinct (C_in, C_out, H) 1x1 layer of the three networks at a
224x224 input (the expansion and projection convolutions of the inverted residual blocks, the
heads, ConvNeXt's MLP pair; squeeze-excitation's 1x1 layers act on 1x1 maps and are left out),
float32, no bias. Each layer alternates the dwops call and the PyTorch call round by round, the
host cache flushed before every call as ``dwops bench`` does
(:class:`dwops.bench.devices.HostDevice`), so background load hits both alike; the table gives
the medians and torch/dwops (> 1: dwops is faster). Both libraries get ``--threads`` threads
(Numba, PyTorch, and the BLAS pools through threadpoolctl).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np

# (C_in, C_out, H) -> networks using it
_MBV2 = [(32, 16, 112), (16, 96, 112), (96, 24, 56), (24, 144, 56), (144, 24, 56), (144, 32, 28),
         (32, 192, 28), (192, 32, 28), (192, 64, 14), (64, 384, 14), (384, 64, 14), (384, 96, 14),
         (96, 576, 14), (576, 96, 14), (576, 160, 7), (160, 960, 7), (960, 160, 7), (960, 320, 7),
         (320, 1280, 7)]
_EFFNET = [(32, 16, 112), (16, 96, 112), (96, 24, 56), (24, 144, 56), (144, 24, 56),
           (144, 40, 28), (40, 240, 28), (240, 40, 28), (240, 80, 14), (80, 480, 14),
           (480, 80, 14), (480, 112, 14), (112, 672, 14), (672, 112, 14), (672, 192, 7),
           (192, 1152, 7), (1152, 192, 7), (1152, 320, 7), (320, 1280, 7)]
_CONVNEXT = [(96, 384, 56), (384, 96, 56), (192, 768, 28), (768, 192, 28), (384, 1536, 14),
             (1536, 384, 14), (768, 3072, 7), (3072, 768, 7)]


def layers():
    """[(C_in, C_out, H, 'mbv2,effnet')] in network order, each shape once."""
    seen = {}
    for name, table in (("mbv2", _MBV2), ("effnet", _EFFNET), ("convnext", _CONVNEXT)):
        for shape in table:
            seen.setdefault(shape, []).append(name)
    return [(*shape, ",".join(names)) for shape, names in seen.items()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--layout", default="NCHW,NHWC")
    ap.add_argument("--direction", default="forward")
    ap.add_argument("--only", default="", help="run only layers whose 'CI->CO @H' contains this")
    args = ap.parse_args()

    import numba
    import torch
    import torch.nn.functional as F

    import dwops
    from dwops.bench.devices import HostDevice

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
    except ImportError:
        pass
    dev = HostDevice()
    rng = np.random.default_rng(0)
    N = args.batch
    print(f"threads={args.threads} batch={N} reps={args.reps} (median ms; torch/dwops > 1: dwops "
          f"faster)")
    print(f"{'layer':22s} {'nets':20s} {'layout':6s} {'direction':11s} {'dwops':>8s} {'torch':>8s} "
          f"{'ratio':>6s}")
    for ci, co, h, nets in layers():
        name = f"{ci}->{co} @{h}"
        if args.only and args.only not in name:
            continue
        x = rng.standard_normal((N, ci, h, h), dtype=np.float32)
        gy = rng.standard_normal((N, co, h, h), dtype=np.float32)
        w = (rng.standard_normal((co, ci), dtype=np.float32) / np.sqrt(ci)).astype(np.float32)
        tw = torch.from_numpy(w).reshape(co, ci, 1, 1)
        for layout in args.layout.split(","):
            xa = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
            ga = gy if layout == "NCHW" else np.ascontiguousarray(gy.transpose(0, 2, 3, 1))
            fmt = torch.contiguous_format if layout == "NCHW" else torch.channels_last
            tx = torch.from_numpy(x).contiguous(memory_format=fmt)
            tg = torch.from_numpy(gy).contiguous(memory_format=fmt)
            for direction in args.direction.split(","):
                if direction == "forward":
                    f_dw = partial(dwops.pointwise_conv2d, xa, w, layout=layout, backend="cpu")
                    f_t = partial(F.conv2d, tx, tw)
                else:
                    mask = (direction == "grad_input", direction == "grad_weight", False)
                    f_t = partial(torch.ops.aten.convolution_backward, tg, tx, tw, None, (1, 1),
                                  (0, 0), (1, 1), False, (0, 0), 1, mask)
                    f_dw = _dwops_grad(dwops, direction, xa, ga, w, layout)
                with torch.no_grad():
                    dm, tm = _interleaved(dev, [f_dw, f_t], args.reps)
                print(f"{name:22s} {nets:20s} {layout:6s} {direction:11s} {dm:8.2f} {tm:8.2f} "
                      f"{tm / dm:6.2f}", flush=True)


def _dwops_grad(dwops, direction, x, gy, w, layout):
    if direction == "grad_input":
        return partial(dwops.pointwise_conv2d_grad_input, gy, w, layout=layout, backend="cpu")
    return partial(dwops.pointwise_conv2d_grad_weight, x, gy, layout=layout, backend="cpu")


def _interleaved(dev, fns, reps, warm=2):
    for f in fns:
        for _ in range(warm):
            f()
    ts = [[] for _ in fns]
    for _ in range(reps):
        for k, f in enumerate(fns):
            dev.flush()
            t = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t)
    return [float(np.median(t)) * 1e3 for t in ts]


if __name__ == "__main__":
    main()
