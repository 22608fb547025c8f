"""One launch of each cupy kernel family on one realistic shape, for Nsight Compute.

    ncu --clock-control none --profile-from-start off --metrics ... \
        python3 scripts/profile_subset.py

Depthwise 3x3 forward (stride 1 and 2), input gradient (stride 1 and 2) and weight gradient on
16x64x112x112 in NCHW and NHWC, float32 and bfloat16 (through PyTorch tensors when PyTorch has
CUDA, else float32 CuPy arrays alone); pointwise 64->64 and the fused separable block on the same
image; the depthwise 1-d op (4x1024x4096, width 4, causal) forward and backward. Every op runs
once on the ``cupy`` backend after a first call that compiles and warms it, inside a profiler
range (cudaProfilerStart/Stop), so the profile holds one launch per kernel and shape (the small
copies CuPy or PyTorch make around a call included), each op labelled on stdout.
"""

from __future__ import annotations

import sys
from functools import partial

import numpy as np

import dwops


def profile(small: bool = False) -> list[str]:
    """Run every op twice, the second time inside the profiler range; the labels run."""
    import cupy

    rng = np.random.default_rng(0)
    n, c, h, w = (2, 8, 9, 11) if small else (16, 64, 112, 112)
    l1 = (1, 8, 33) if small else (4, 1024, 4096)

    def arr(shape, dtype):
        return cupy.asarray(rng.uniform(-1, 1, shape).astype(np.float32)).astype(dtype)

    dtypes = ["float32"]
    try:
        import torch

        if torch.cuda.is_available():
            dtypes.append("bfloat16")
    except ImportError:
        torch = None

    def tensor(a, dtype):
        if dtype == "float32":
            return a
        return torch.from_dlpack(a).to(getattr(torch, dtype))

    runs = []
    for dtype in dtypes:
        for layout in ("NCHW", "NHWC"):
            shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
            x = tensor(arr(shape, "float32"), dtype)
            wt = tensor(arr((c, 1, 3, 3), "float32"), dtype)
            pw = tensor(arr((c, c), "float32"), dtype)
            tag = f"{layout} {dtype}"
            for s in (1, 2):
                kw = dict(stride=s, padding=1, layout=layout, backend="cupy")
                y = dwops.depthwise_conv2d(x, wt, **kw)
                runs.append((f"depthwise forward s{s} {tag}",
                             partial(dwops.depthwise_conv2d, x, wt, **kw)))
                runs.append((f"depthwise grad_input s{s} {tag}",
                             partial(dwops.depthwise_conv2d_grad_input, y, wt, tuple(x.shape),
                                     **kw)))
                if s == 1:
                    runs.append((f"depthwise grad_weight s1 {tag}",
                                 partial(dwops.depthwise_conv2d_grad_weight, x, y,
                                         tuple(wt.shape), **kw)))
            runs.append((f"pointwise forward {tag}",
                         partial(dwops.pointwise_conv2d, x, pw, layout=layout, backend="cupy")))
            runs.append((f"separable forward {tag}",
                         partial(dwops.separable_conv2d, x, wt, pw, padding=1, layout=layout,
                                 backend="cupy")))
    x1 = arr(l1, "float32")
    w1 = arr((l1[1], 1, 4), "float32")
    y1 = dwops.depthwise_conv1d(x1, w1, padding="causal", backend="cupy")
    runs.append(("conv1d forward NCL float32",
                 partial(dwops.depthwise_conv1d, x1, w1, padding="causal", backend="cupy")))
    runs.append(("conv1d backward NCL float32",
                 partial(dwops.depthwise_conv1d_backward, x1, y1, w1, padding="causal",
                         backend="cupy")))
    for _, fn in runs:      # compile (and warm) every kernel before the profiled range
        fn()
    cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.profiler.start()   # ncu --profile-from-start off profiles from here
    for label, fn in runs:
        print(f"profile: {label}", flush=True)
        fn()
        cupy.cuda.runtime.deviceSynchronize()
    cupy.cuda.profiler.stop()
    return [label for label, _ in runs]


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true",
                    help="tiny shapes (a check that the script runs, e.g. under the emulator)")
    profile(ap.parse_args(argv).small)
    return 0


if __name__ == "__main__":
    sys.exit(main())
