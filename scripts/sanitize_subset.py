"""A small run of every GPU op of both GPU backends, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/sanitize_subset.py

Each op runs once per backend on small, odd shapes (sizes that do not divide the tiles, a channel
multiplier, strides 1 and 2, the specialized kernel sizes 3 and 5 and the generic path at 9; the
1-d op with causal states, packed sequences and decode steps), in
float32 and float16, NCHW and NHWC, with NumPy arrays in and out, and is compared with
:mod:`dwops.reference`. Exit status 1 on any error or wrong result; the sanitizer adds its own.
Use ``--backend`` to restrict to one backend, ``--quick`` for float32 and NCHW only.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import numpy as np

import dwops
from dwops import reference as ref
from dwops._registry import numpy_dtype

TOL = {"float32": 1e-4, "float16": 4e-3}

# (N, C, H, W, M, K, stride): depthwise geometries
DEPTHWISE = [(2, 5, 11, 13, 1, 3, 1), (1, 3, 9, 7, 2, 5, 2), (2, 4, 17, 6, 1, 9, 1)]
# (N, C_in, C_out, H, W): pointwise geometries
POINTWISE = [(2, 5, 7, 9, 11), (1, 64, 64, 5, 3)]
# (N, C, L, M, K, stride, padding): depthwise 1-d geometries (causal ones also with states)
CONV1D = [(2, 5, 37, 1, 4, 1, "causal"), (1, 3, 29, 2, 3, 2, "same"), (2, 4, 23, 1, 9, 1, "causal")]


def rel_err(a, e) -> float:
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    if a.shape != e.shape or not np.array_equal(np.isnan(a), np.isnan(e)):
        return float("inf")
    return float(np.nanmax(np.abs(a - e)) / max(np.nanmax(np.abs(e)), 1e-30))


def rand(rng, shape, dtype):
    return rng.uniform(-1, 1, shape).astype(np.float32).astype(numpy_dtype(dtype))


def phys(a, layout):
    return a if layout == "NCHW" else np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def cases(rng, dtype, layout):
    """(name, dwops call taking backend=, reference result) for every op on small shapes."""
    out = []
    for n, c, h, w, m, k, s in DEPTHWISE:
        x = phys(rand(rng, (n, c, h, w), dtype), layout)
        wt = rand(rng, (c * m, 1, k, k), dtype)
        b = rand(rng, (c * m,), dtype)
        conv = dict(stride=s, padding=k // 2, layout=layout)
        y = ref.depthwise_conv2d(x, wt, b, activation="silu", **conv)
        gy = rand(rng, y.shape, dtype)
        tag = f"{n}x{c}x{h}x{w} M{m} k{k} s{s}"
        out.append((f"depthwise forward {tag}",
                    lambda be, x=x, wt=wt, b=b, conv=conv: dwops.depthwise_conv2d(
                        x, wt, b, activation="silu", backend=be, **conv), y))
        out.append((f"depthwise grad_input {tag}",
                    lambda be, gy=gy, wt=wt, x=x, conv=conv: dwops.depthwise_conv2d_grad_input(
                        gy, wt, x.shape, backend=be, **conv),
                    ref.depthwise_conv2d_grad_input(gy, wt, x.shape, **conv)))
        out.append((f"depthwise grad_weight {tag}",
                    lambda be, x=x, gy=gy, wt=wt, conv=conv: dwops.depthwise_conv2d_grad_weight(
                        x, gy, wt.shape, backend=be, **conv),
                    ref.depthwise_conv2d_grad_weight(x, gy, wt.shape, **conv)))
    for n, ci, co, h, w in POINTWISE:
        x = phys(rand(rng, (n, ci, h, w), dtype), layout)
        wt = rand(rng, (co, ci), dtype)
        b = rand(rng, (co,), dtype)
        r = phys(rand(rng, (n, co, h, w), dtype), layout)
        gy = r
        tag = f"{n}x{ci}->{co} {h}x{w}"
        out.append((f"pointwise forward {tag}",
                    lambda be, x=x, wt=wt, b=b, r=r: dwops.pointwise_conv2d(
                        x, wt, b, activation="relu", residual=r, layout=layout, backend=be),
                    ref.pointwise_conv2d(x, wt, b, activation="relu", residual=r, layout=layout)))
        out.append((f"pointwise grad_input {tag}",
                    lambda be, gy=gy, wt=wt: dwops.pointwise_conv2d_grad_input(
                        gy, wt, layout=layout, backend=be),
                    ref.pointwise_conv2d_grad_input(gy, wt, layout=layout)))
        out.append((f"pointwise grad_weight {tag}",
                    lambda be, x=x, gy=gy: dwops.pointwise_conv2d_grad_weight(
                        x, gy, layout=layout, backend=be),
                    ref.pointwise_conv2d_grad_weight(x, gy, layout=layout)))
    lay1 = "NCL" if layout == "NCHW" else "NLC"
    for n, c, length, m, k, s, pad in CONV1D:
        x = rand(rng, (n, c, length), dtype)
        x = x if lay1 == "NCL" else np.ascontiguousarray(x.transpose(0, 2, 1))
        wt, b = rand(rng, (c * m, 1, k), dtype), rand(rng, (c * m,), dtype)
        causal = pad == "causal"
        st = rand(rng, (n, c, k - 1), dtype) if causal else None
        seq = np.repeat(np.arange(2), [length // 3, length - length // 3])[None].repeat(n, 0) \
            if causal else None
        conv = dict(stride=s, padding=pad, layout=lay1, initial_state=st, seq_idx=seq)
        tag = f"{n}x{c}x{length} M{m} k{k} s{s} {pad}"
        y = ref.depthwise_conv1d(x, wt, b, activation="silu", **conv)
        gy = rand(rng, y.shape, dtype)
        out.append((f"conv1d forward {tag}",
                    lambda be, x=x, wt=wt, b=b, conv=conv: dwops.depthwise_conv1d(
                        x, wt, b, activation="silu", backend=be, **conv), y))
        need = dict(need_bias=True, need_initial_state=causal)
        grads = ref.depthwise_conv1d_backward(x, gy, wt, **conv, **need)
        for i, what in enumerate(("grad_input", "grad_weight", "grad_bias", "grad_state")):
            if grads[i] is not None:
                out.append((f"conv1d backward {what} {tag}",
                            lambda be, x=x, gy=gy, wt=wt, conv=conv, need=need, i=i:
                            dwops.depthwise_conv1d_backward(x, gy, wt, backend=be, **conv,
                                                            **need)[i], grads[i]))
        if causal:
            xs = np.ascontiguousarray(x[:, :, :3] if lay1 == "NCL" else x[:, :3].transpose(0, 2, 1))
            out.append((f"conv1d update {tag}",
                        lambda be, xs=xs, st=st, wt=wt, b=b: dwops.depthwise_conv1d_update(
                            xs, st.copy(), wt, b, activation="silu", backend=be)[0],
                        ref.depthwise_conv1d_update(xs, st.copy(), wt, b, activation="silu")[0]))
    for n, c, h, w in [(2, 64, 9, 13), (1, 6, 7, 5)]:  # the motivating block, and odd channels
        x = phys(rand(rng, (n, c, h, w), dtype), layout)
        dw_w, pw_w, b = rand(rng, (c, 1, 3, 3), dtype), rand(rng, (c, c), dtype), rand(rng, (c,), dtype)
        out.append((f"separable block {n}x{c}x{h}x{w}",
                    lambda be, x=x, dw_w=dw_w, pw_w=pw_w, b=b: dwops.separable_conv2d(
                        x, dw_w, pw_w, b, padding="same", dw_activation="relu", residual=x,
                        layout=layout, backend=be),
                    ref.separable_conv2d(x, dw_w, pw_w, b, padding="same", dw_activation="relu",
                                         residual=x, layout=layout)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", action="append", choices=("cupy", "numba"), default=None)
    ap.add_argument("--quick", action="store_true", help="float32 and NCHW only")
    args = ap.parse_args(argv)
    backends = args.backend or ["cupy", "numba"]
    failures, runs = [], 0
    for be in backends:
        if not dwops.backend_available(be):
            try:
                dwops._registry.load(be)
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{be}: unavailable: {exc}")
            continue
        for dtype in (("float32",) if args.quick else ("float32", "float16")):
            for layout in (("NCHW",) if args.quick else ("NCHW", "NHWC")):
                rng = np.random.default_rng(len(dtype) * 7 + len(layout))
                for name, call, want in cases(rng, dtype, layout):
                    label = f"{be} {dtype} {layout} {name}"
                    runs += 1
                    try:
                        err = rel_err(call(be), want)
                    except Exception as exc:  # noqa: BLE001 - report every failure, then fail
                        failures.append(f"{label}: {type(exc).__name__}: {exc}")
                        traceback.print_exc()
                        continue
                    status = "ok" if err <= TOL[dtype] else "WRONG"
                    print(f"{status:5} {label}: max_rel_err {err:.2e}", flush=True)
                    if status != "ok":
                        failures.append(f"{label}: max_rel_err {err:.3e} > {TOL[dtype]:.0e}")
    print(f"{runs} runs, {len(failures)} failures")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures or runs == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
