"""One case made concrete: its inputs on a device, the dwops call, the baselines, the check.

Inputs are drawn once per case as logical ``(N, C, H, W)`` arrays (uniform in [-1, 1], never zeros)
and laid out physically per layout; every backend and every baseline of the case reads the same
values. Baselines compute the same function:

* ``torch``: PyTorch eager on the same memory (``F.conv2d(groups=C)``; gradients through
  ``aten.convolution_backward``, what autograd calls; NHWC as ``channels_last``);
* ``torch_compile``: ``torch.compile`` of the block (block cases only);
* ``jax``: ``jax.lax.conv_general_dilated(feature_group_count=C)`` under ``jax.jit`` (forward only);
* ``dense3x3``: the same input through one dense ``K x K`` ``C -> C`` convolution (PyTorch on the
  same device, else NumPy im2col + matmul on the host), the "should be 9x faster" comparison.

Correctness: every row checks the very call it times, whole, against :mod:`dwops.reference` run
on the same inputs converted to float64, element by element: ``|dwops - reference| <= TOLERANCE *
sum|products|`` per element (the same computation on the inputs' absolute values: the scale of that
element's rounding error), NaN and infinities where and only where the reference has them. The
normwise ``max_rel_err = max |dwops - reference| / max |reference|`` is reported, and must be within
the tolerance too.

The reference is vectorized NumPy (one pass over the data per kernel tap) in parts on every host
core, run twice per case and direction (values and scales) and shared by every layout and backend:
``2 * N*C*OH*OW*K*K`` float64 multiply-adds. Measured on two cores: 16 s for the forward of
64x32x112x112 k3, 37 s for the block at 64x64x112x112, 17 s for the forward of 2x384x32x32 k31
(so minutes per direction for the 31x31 layers at batch 64, the largest; a ``--budget`` counts
this time).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .cases import Case

# Largest acceptable max_rel_err (normwise, see the module docstring): a few units of the dtype's
# rounding, far below what an indexing or synchronization error produces.
TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 4e-3, "bfloat16": 3.2e-2}

BASELINES = ("torch", "torch_compile", "jax", "dense3x3")


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max |actual - expected| / max |expected|`` in float64; inf if any NaN differs."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"result shape {a.shape} != reference shape {e.shape}")
    if not np.array_equal(np.isnan(a), np.isnan(e)):
        return math.inf
    scale = np.nanmax(np.abs(e)) if e.size else 0.0
    diff = np.nanmax(np.abs(a - e)) if a.size else 0.0
    return float(diff / scale) if scale > 0 else float(diff)


@dataclass(frozen=True)
class Verdict:
    """A row's check: the normwise error reported in the JSON, and what failed (None if nothing)."""

    max_rel_err: float
    problem: str | None = None


def compare(actual, expected, scale, dtype: str, what: str = "") -> Verdict:
    """The gate for one result: every element within ``TOLERANCE[dtype] * scale`` of ``expected``
    (``scale``: the element's sum of absolute products), NaN where and only where ``expected`` is,
    the same infinities; and ``max_rel_err`` (normwise) within the tolerance too."""
    tol = TOLERANCE[dtype]
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    err = rel_err(a, e)  # checks the shapes
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - e)
        diff[(nan_a & nan_e) | (a == e)] = 0.0  # a == e: equal infinities
        diff[np.isnan(diff)] = np.inf
        bound = tol * np.asarray(scale, dtype=np.float64)
        bad = ~(diff <= bound) | (nan_a != nan_e) | ((np.isinf(a) | np.isinf(e)) & ~(a == e))
        bad &= ~(nan_a & nan_e)
    problems = []
    n = int(np.count_nonzero(bad))
    if n:
        with np.errstate(divide="ignore", invalid="ignore"):
            excess = np.where(bad, np.nan_to_num(diff / bound, nan=np.inf), -1.0)
        i = np.unravel_index(int(np.argmax(excess)), a.shape)
        problems.append(f"{n} of {a.size} elements outside |dwops - reference| <= "
                        f"{tol:.1e} x sum|products|; worst at {tuple(int(k) for k in i)}: {float(a[i])!r} against "
                        f"{float(e[i])!r} (bound {float(bound[i]):.3e})")
    if not err <= tol:
        problems.append(f"max_rel_err {err:.3e} exceeds the {dtype} tolerance {tol:.1e}")
    if problems and what:
        problems[0] = f"{what}: {problems[0]}"
    return Verdict(err, "; ".join(problems) if problems else None)


class Instance:
    """The arrays of one :class:`Case` on one device, in both layouts."""

    def __init__(self, case: Case, device, seed: int = 0):
        self.case, self.dev = case, device
        c = case
        rnd = lambda shape, k: device.random(shape, c.dtype, seed * 101 + k)  # noqa: E731
        if c.op == "conv1d":
            self.arrays = {"x": rnd((c.N, c.C, c.L), 1), "w": rnd((c.C, 1, c.K), 2),
                           "b": rnd((c.C,), 3)}
            if "backward" in c.directions:
                self.arrays["gy"] = rnd((c.N, c.C, c.L), 4)
            self._phys, self._ref, self._host = {}, {}, {}
            return
        self.arrays = {"x": rnd((c.N, c.C, c.H, c.W), 1)}
        if c.op == "depthwise":
            self.arrays["w"] = rnd((c.C, 1, c.K, c.K), 2)
            if any(d != "forward" for d in c.directions):
                self.arrays["gy"] = rnd((c.N, c.C, c.OH, c.OW), 3)
        elif c.op == "pointwise":
            self.arrays["w"] = rnd((c.CO, c.C), 2)
        else:  # block, block_unfused
            self.arrays["dw_w"] = rnd((c.C, 1, c.K, c.K), 2)
            self.arrays["pw_w"] = rnd((c.CO, c.C), 3)
            self.arrays["b"] = rnd((c.CO,), 4)
        self._phys = {}
        self._ref = {}
        self._host = {}

    # -- arrays
    def phys(self, name: str, layout: str):
        """``name`` in ``layout`` (4-d activations are transposed for NHWC; weights are not)."""
        a = self.arrays[name]
        if layout == "NCHW" or name not in ("x", "gy"):
            return a
        key = (name, layout)
        if key not in self._phys:
            if a.ndim == 3:  # (N, C, L) -> (N, L, C) through the 4-d transpose
                n, ch, length = a.shape
                self._phys[key] = self.dev.nhwc(a[:, :, None, :]).reshape(n, length, ch)
            else:
                self._phys[key] = self.dev.nhwc(a)
        return self._phys[key]

    def host(self, name: str):
        """Host copy (logical NCHW) of ``name``."""
        if name not in self._host:
            self._host[name] = self.dev.to_host(self.arrays[name], self.case.dtype)
        return self._host[name]

    # -- dwops
    def dwops_fn(self, direction: str, layout: str, backend: str):
        """A no-argument callable running the case through dwops."""
        import dwops

        c = self.case
        x = self.phys("x", layout)
        kw = dict(layout=layout, backend=backend)
        if c.op == "conv1d":
            w, b = self.arrays["w"], self.arrays["b"]
            kw = dict(layout=c.layout_name(layout), backend=backend, padding="causal")
            if direction == "forward":
                return lambda: dwops.depthwise_conv1d(x, w, b, activation="silu", **kw)
            gy = self.phys("gy", layout)
            return lambda: dwops.depthwise_conv1d_backward(x, gy, w, need_bias=True, **kw)
        if c.op == "depthwise":
            conv = dict(stride=c.stride, padding=c.padding, **kw)
            w = self.arrays["w"]
            if direction == "forward":
                return lambda: dwops.depthwise_conv2d(x, w, **conv)
            gy = self.phys("gy", layout)
            if direction == "grad_input":
                shape = tuple(x.shape)
                return lambda: dwops.depthwise_conv2d_grad_input(gy, w, shape, **conv)
            return lambda: dwops.depthwise_conv2d_grad_weight(x, gy, tuple(w.shape), **conv)
        if c.op == "pointwise":
            w = self.arrays["w"]
            return lambda: dwops.pointwise_conv2d(x, w, **kw)
        dw_w, pw_w, b = self.arrays["dw_w"], self.arrays["pw_w"], self.arrays["b"]
        if c.op == "block":
            return lambda: dwops.separable_conv2d(x, dw_w, pw_w, b, padding="same",
                                                  dw_activation="relu", residual=x, **kw)

        def unfused():
            h = dwops.depthwise_conv2d(x, dw_w, padding="same", activation="relu", **kw)
            return dwops.pointwise_conv2d(h, pw_w, b, residual=x, **kw)

        return unfused

    def reference(self, direction: str):
        """(values, scales) of the timed problem, logical NCHW (NCL for 1-d), both float64 arrays,
        or tuples of them for the 1-d backward (grad_input, grad_weight, grad_bias): the values are
        :mod:`dwops.reference` on the inputs converted to float64 (not rounded to the dtype); the
        scales are the same computation on the inputs' absolute values, without activations (each
        element's sum of absolute products, which bounds its rounding error). Cached per direction.

        Computed in parts on the host's cores (NumPy releases the GIL): channel groups for the
        depthwise ops, whose channels are independent (the weight gradient too), image groups for
        pointwise and block (forward only). Each element is computed as in one call.
        """
        if direction in self._ref:
            return self._ref[direction]
        from dwops import reference as ref

        c = self.case
        per_channel = c.op in ("conv1d", "depthwise")
        f64 = {k: np.asarray(self.host(k), dtype=np.float64) for k in self.arrays}

        def part(sl, scale):
            """The reference (``scale``: of absolute values) on channels or images ``sl``."""
            a = {}
            for k, v in f64.items():
                if per_channel:
                    v = v[sl] if k in ("w", "b") else v[:, sl]
                elif k in ("x", "gy"):
                    v = v[sl]
                a[k] = np.abs(v) if scale else v
            if c.op == "conv1d":
                if direction == "forward":
                    return ref.depthwise_conv1d(a["x"], a["w"], a["b"], padding="causal",
                                                activation=None if scale else "silu")
                return ref.depthwise_conv1d_backward(a["x"], a["gy"], a["w"], padding="causal",
                                                     need_bias=True)[:3]
            if c.op == "depthwise":
                conv = dict(stride=c.stride, padding=c.padding)
                if direction == "forward":
                    return ref.depthwise_conv2d(a["x"], a["w"], **conv)
                if direction == "grad_input":
                    return ref.depthwise_conv2d_grad_input(a["gy"], a["w"], a["x"].shape, **conv)
                return ref.depthwise_conv2d_grad_weight(a["x"], a["gy"], a["w"].shape, **conv)
            if c.op == "pointwise":
                return ref.pointwise_conv2d(a["x"], a["w"])
            # block, block_unfused: relu is 1-Lipschitz, so the scale drops it
            return ref.separable_conv2d(a["x"], a["dw_w"], a["pw_w"], a["b"], padding="same",
                                        dw_activation=None if scale else "relu", residual=a["x"])

        # concatenation axis of each result: activations by channel (1) or image (0), weight and
        # bias gradients (whose first axis is the channel) 0
        if not per_channel:
            axes = (0,)
        elif c.op == "conv1d":
            axes = (1,) if direction == "forward" else (1, 0, 0)
        else:
            axes = (0,) if direction == "grad_weight" else (1,)
        n = c.C if per_channel else c.N
        k = max(1, min(n, os.cpu_count() or 1))
        slices = [slice(i * n // k, (i + 1) * n // k) for i in range(k)]
        jobs = [(sl, scale) for scale in (False, True) for sl in slices]
        with ThreadPoolExecutor(k) as pool:
            done = list(pool.map(lambda job: part(*job), jobs))

        def joined(results):
            if len(axes) == 1:
                return np.concatenate(results, axis=axes[0])
            return tuple(np.concatenate([r[i] for r in results], axis=ax)
                         for i, ax in enumerate(axes))

        r = joined(done[:k]), joined(done[k:])
        self._ref[direction] = r
        return r

    def check(self, direction: str, layout: str, backend: str) -> "Verdict":
        """The correctness gate of one row: the timed call's whole result against the reference of
        the same problem, element by element (see :func:`compare` and the module docstring)."""
        c = self.case
        host = lambda a: self.dev.to_host(a, c.dtype)  # noqa: E731
        out = self.dwops_fn(direction, layout, backend)()
        want, scale = self.reference(direction)
        if c.op == "conv1d":
            logical = (lambda a: a) if layout == "NCHW" else (lambda a: a.transpose(0, 2, 1))
            if direction == "forward":
                return compare(logical(host(out)), want, scale, c.dtype)
            names = ("grad_input", "grad_weight", "grad_bias")
            got = (logical(host(out[0])), host(out[1]), host(out[2]))
            parts = [compare(g, w, sc, c.dtype, n) for n, g, w, sc in zip(names, got, want, scale)]
            problems = [v.problem for v in parts if v.problem]
            return Verdict(max(v.max_rel_err for v in parts),
                           "; ".join(problems) if problems else None)
        got = host(out)
        if layout == "NHWC" and direction != "grad_weight":
            got = got.transpose(0, 3, 1, 2)
        return compare(got, want, scale, c.dtype)

    # -- baselines
    def baseline_fn(self, name: str, direction: str, layout: str):
        """A no-argument callable for baseline ``name``, or None if it does not apply here."""
        c = self.case
        block = c.op in ("block", "block_unfused")
        if name == "torch":
            if c.op == "conv1d":
                return self._torch_conv1d_fn(direction, layout)
            return self._torch_fn(direction, layout, compiled=False)
        if name == "torch_compile":
            return self._torch_fn(direction, layout, compiled=True) if block else None
        if name == "dense3x3":  # the motivating layer only: C = 64, 3x3
            if direction != "forward" or c.op == "pointwise" or (c.K, c.C) != (3, 64):
                return None
            return self._dense_fn(layout)
        raise KeyError(name)

    def _torch_tensors(self, layout):
        import torch

        t = {}
        cl = layout == "NHWC"
        for name, a in self.arrays.items():
            v = self.dev.torch_view(self.phys(name, layout))
            if name in ("x", "gy") and cl:
                v = v.permute(0, 3, 1, 2)  # logical NCHW view of NHWC memory: channels_last
            elif name in ("w", "dw_w", "pw_w"):
                if v.dim() == 2:
                    v = v.reshape(v.shape[0], v.shape[1], 1, 1)
                if cl:
                    v = v.contiguous(memory_format=torch.channels_last)
            t[name] = v
        return t

    def _torch_conv1d_fn(self, direction, layout):
        """What a PyTorch sequence model calls: ``silu(conv1d(x, w, b, padding=K-1)[..., :L])``
        (NLC memory as a transposed view); backward through ``aten.convolution_backward`` with
        ``grad_output`` zero-extended to the padded output (made once, outside the timing)."""
        import torch
        import torch.nn.functional as F

        c = self.case
        view = self.dev.torch_view
        x, w, b = view(self.phys("x", layout)), view(self.arrays["w"]), view(self.arrays["b"])
        if layout == "NHWC":
            x = x.transpose(1, 2)
        p = c.K - 1
        if direction == "forward":
            return lambda: F.silu(F.conv1d(x, w, b, padding=p, groups=c.C)[..., :c.L])
        gy = view(self.phys("gy", layout))
        if layout == "NHWC":
            gy = gy.transpose(1, 2)
        gy = F.pad(gy, (0, p))
        return lambda: torch.ops.aten.convolution_backward(
            gy, x, w, [c.C], [1], [p], [1], False, [0], c.C, [True, True, True])

    def _torch_fn(self, direction, layout, compiled):
        import torch
        import torch.nn.functional as F

        c = self.case
        t = self._torch_tensors(layout)
        x = t["x"]
        if c.op == "depthwise":
            w, s, p = t["w"], c.stride, c.padding
            if direction == "forward":
                return lambda: F.conv2d(x, w, None, s, p, 1, c.C)
            gy = t["gy"]
            mask = [direction == "grad_input", direction == "grad_weight", False]
            return lambda: torch.ops.aten.convolution_backward(
                gy, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0], c.C, mask)
        if c.op == "pointwise":
            w = t["w"]
            return lambda: F.conv2d(x, w)
        dw_w, pw_w, b, p = t["dw_w"], t["pw_w"], t["b"], c.padding

        def block(x, dw_w, pw_w, b):
            return x + F.conv2d(F.relu(F.conv2d(x, dw_w, None, 1, p, 1, c.C)), pw_w, b)

        if compiled:  # a fresh compile per shape: dynamo's per-code recompile limit never kicks in
            torch._dynamo.reset()
            fn = torch.compile(block, dynamic=False)
        else:
            fn = block
        return lambda: fn(x, dw_w, pw_w, b)

    def _dense_fn(self, layout):
        """One dense K x K C -> C convolution of the same input."""
        c = self.case
        try:
            import torch  # noqa: F401

            have_torch = True
        except ImportError:
            have_torch = False
        if have_torch:
            import torch
            import torch.nn.functional as F

            tdev = self.dev.torch_device()
            wd = torch.empty((c.C, c.C, c.K, c.K), dtype=getattr(torch, c.dtype), device=tdev)
            wd.uniform_(-1.0, 1.0)
            x = self.dev.torch_view(self.phys("x", layout))
            if layout == "NHWC":
                x = x.permute(0, 3, 1, 2)
                wd = wd.contiguous(memory_format=torch.channels_last)
            s, p = c.stride, c.padding
            return lambda: F.conv2d(x, wd, None, s, p)
        if self.dev.on_gpu:
            return None
        return _numpy_dense(self.phys("x", "NCHW"), c)


def _numpy_dense(x: np.ndarray, c: Case):
    """im2col + matmul on the host: columns (N*OH*OW, C*K*K) times weights (C*K*K, C)."""
    from numpy.lib.stride_tricks import sliding_window_view

    wd = np.random.default_rng(7).uniform(-1, 1, (c.C * c.K * c.K, c.C)).astype(x.dtype)
    p, s = c.padding, c.stride

    def dense():
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        win = sliding_window_view(xp, (c.K, c.K), axis=(2, 3))[:, :, ::s, ::s]  # N C OH OW K K
        cols = np.ascontiguousarray(win.transpose(0, 2, 3, 1, 4, 5)).reshape(-1, c.C * c.K * c.K)
        return (cols @ wd).reshape(c.N, c.OH, c.OW, c.C)

    return dense


# ----------------------------------------------------------------------------- JAX


def jax_ready(device) -> bool:
    """Whether a JAX baseline can run on ``device`` (JAX on the same kind of device)."""
    if not device.on_gpu:
        return False
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to the others
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except Exception:  # noqa: BLE001 - no jax or no CUDA plugin: no baseline
        return False


def jax_time(inst: Instance, layout: str, l2_bytes: int, *, min_iters=10, max_iters=50,
             target_s=0.1, batches=5):
    """Median milliseconds per call of the jitted JAX forward, or None if it does not apply.

    JAX has no event API, so each batch of calls is timed on the wall clock and divided; inputs
    rotate among enough copies to exceed three times the L2 cache. For calls under ~20 us this
    measures JAX's dispatch rather than its kernel.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    c = inst.case
    dn = (layout, "OIHW", layout)

    def to_jax(name):
        a = inst.phys(name, layout)
        try:
            return jnp.array(jax.dlpack.from_dlpack(a), copy=True)
        except Exception:  # noqa: BLE001 - fall back to a host round trip
            return jnp.asarray(inst.dev.to_host(a, c.dtype))

    x = to_jax("x")
    if c.op == "depthwise":
        w = to_jax("w")
        p = c.padding

        @jax.jit
        def f(x, w):
            return lax.conv_general_dilated(x, w, (c.stride, c.stride), [(p, p), (p, p)],
                                            dimension_numbers=dn, feature_group_count=c.C)
        params = (w,)
    elif c.op == "pointwise":
        w = to_jax("w").reshape(c.CO, c.C, 1, 1)

        @jax.jit
        def f(x, w):
            return lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dn)
        params = (w,)
    else:
        dw_w, pw_w, b = to_jax("dw_w"), to_jax("pw_w").reshape(c.CO, c.C, 1, 1), to_jax("b")
        p = c.padding
        bshape = (1, c.CO, 1, 1) if layout == "NCHW" else (1, 1, 1, c.CO)

        @jax.jit
        def f(x, dw_w, pw_w, b):
            h = lax.conv_general_dilated(x, dw_w, (1, 1), [(p, p), (p, p)],
                                         dimension_numbers=dn, feature_group_count=c.C)
            y = lax.conv_general_dilated(jax.nn.relu(h), pw_w, (1, 1), "VALID",
                                         dimension_numbers=dn)
            return x + y + b.reshape(bshape)
        params = (dw_w, pw_w, b)
    nbytes = x.size * x.dtype.itemsize
    extra = min(7, max(1, math.ceil(3 * l2_bytes / nbytes)))
    copies = [x] + [jnp.array(x, copy=True) for _ in range(extra)]
    f(copies[0], *params).block_until_ready()  # compile
    t0 = time.perf_counter()
    f(copies[1], *params).block_until_ready()
    n = max(min_iters, min(max_iters, int(target_s / max(time.perf_counter() - t0, 1e-9))))
    per_call = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for i in range(n):
            r = f(copies[i % len(copies)], *params)
        r.block_until_ready()
        per_call.append((time.perf_counter() - t0) * 1e3 / n)
    return statistics.median(per_call)
