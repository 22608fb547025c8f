"""Just-in-time compilation, made visible: a one-line notice while a kernel compiles, and the
warm-up that compiles ahead of time.

The ``cpu`` and ``numba`` backends compile their kernels with Numba on the first call of each
signature (op, dtype, layout, parameter types) and cache them on disk: in ``__pycache__`` beside the
package when it is writable, else in the user's cache directory (Numba's own fallback), or in
``NUMBA_CACHE_DIR`` when that is set. A cold compile takes seconds (the parallel CPU kernels most);
loading a cached kernel takes about a second per process.

* :func:`install_notice` makes every compile of a dwops kernel print one line on stderr, once per
  kernel, so a first call that takes seconds says why. ``DWOPS_QUIET=1`` silences it.
* :func:`warmup` compiles the CPU kernels (and, where a GPU backend runs, its kernels) of the chosen
  ops and dtypes in parallel worker processes, so later processes only load them:
  ``python -m dwops warmup``.
"""

from __future__ import annotations

import os
import sys
import threading
import time

_lock = threading.Lock()
_installed = False
_announced: set[str] = set()
_depth = threading.local()


def quiet() -> bool:
    return os.environ.get("DWOPS_QUIET", "") not in ("", "0")


def install_notice() -> None:
    """Register (once) a Numba compile listener that announces each dwops kernel's first compile."""
    global _installed
    if _installed:  # the common case, on every GPU launch: no lock
        return
    with _lock:
        if _installed:
            return
        from numba.core import event

        class _Notice(event.Listener):
            """One line when an outermost dwops kernel starts compiling (its callees compile
            inside it, on the same thread: one line per kernel is enough)."""

            def on_start(self, ev):
                depth = getattr(_depth, "n", 0)
                _depth.n = depth + 1
                disp = ev.data.get("dispatcher")
                func = getattr(disp, "py_func", None)
                mod = getattr(func, "__module__", "") or ""
                if depth or not mod.startswith("dwops.") or quiet():
                    return
                name = f"{mod.rsplit('.', 1)[-1].lstrip('_')}.{func.__name__.lstrip('_')}"
                with _lock:
                    if name in _announced:
                        return
                    _announced.add(name)
                print(f"dwops: compiling {name} for {_types(ev.data.get('args'))} (once: later "
                      "runs load it from the disk cache; DWOPS_QUIET=1 hides this)",
                      file=sys.stderr, flush=True)

            def on_end(self, ev):
                _depth.n = max(0, getattr(_depth, "n", 1) - 1)

        event.register("numba:compile", _Notice())
        _installed = True


def _types(args) -> str:
    """The dtypes of a compile's array arguments, e.g. ``float32 arrays``."""
    dts = []
    for a in args or ():
        dt = getattr(a, "dtype", None)
        if dt is not None and getattr(a, "ndim", 0) and str(dt) not in dts:
            dts.append(str(dt))
    return (", ".join(dts) + " arrays") if dts else "its argument types"


# ----------------------------------------------------------------------------- warm-up

WARMUP_OPS = ("depthwise_conv2d", "depthwise_conv2d_grad_input", "depthwise_conv2d_grad_weight",
              "pointwise_conv2d", "pointwise_conv2d_grad_input", "pointwise_conv2d_grad_weight",
              "separable_conv2d", "depthwise_conv1d", "depthwise_conv1d_backward",
              "depthwise_conv1d_update")


def warmup_job(op: str, dtype: str, layout: str, backend: str, strides=(1, 2)) -> float:
    """Call ``op`` once per stride in ``strides`` on small random inputs (with a bias and an
    activation where it takes them), so its kernels compile and reach the disk cache; seconds
    taken. Only ``op`` itself runs: gradients get random upstream gradients."""
    import numpy as np

    import dwops
    from dwops._registry import numpy_dtype

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    dt = numpy_dtype(dtype)

    if backend == "cpu":
        def put(a):
            return a
    else:
        try:
            import cupy

            put = cupy.asarray
        except ImportError:  # the numba backend without CuPy: Numba device arrays
            from numba import cuda

            put = cuda.to_device

    def arr(*shape):
        return put(rng.standard_normal(shape).astype(np.float32).astype(dt))

    C, L = 8, 17
    if not op.startswith("depthwise_conv1d"):
        def img(c, h):  # an (N, c, h, h) image in the layout
            return arr(2, h, h, c) if layout == "NHWC" else arr(2, c, h, h)

        # NCHW depthwise has a kernel for small planes (channel groups) and one for large ones
        sizes = (9, 33) if layout == "NCHW" and not op.startswith("pointwise") else (9,)
        w, b, pw = arr(C, 1, 3, 3), arr(C), arr(C, C)
        kw = dict(layout=layout, backend=backend)
        for H in sizes:
            x = img(C, H)
            for s in strides:
                gy = img(C, (H + 2 - 3) // s + 1)  # the output of a 3x3, padding 1, stride s
                if op == "depthwise_conv2d":
                    dwops.depthwise_conv2d(x, w, b, stride=s, padding=1, activation="relu",
                                           **kw)
                elif op == "depthwise_conv2d_grad_input":
                    dwops.depthwise_conv2d_grad_input(gy, w, x.shape, stride=s, padding=1, **kw)
                elif op == "depthwise_conv2d_grad_weight":
                    dwops.depthwise_conv2d_grad_weight(x, gy, w.shape, stride=s, padding=1,
                                                       **kw)
                elif op == "separable_conv2d":
                    dwops.separable_conv2d(x, w, pw, b, stride=s, padding=1,
                                           dw_activation="relu", **kw)
                elif op == "pointwise_conv2d":
                    dwops.pointwise_conv2d(x, pw, b, activation="relu", **kw)
                elif op == "pointwise_conv2d_grad_input":
                    dwops.pointwise_conv2d_grad_input(x, pw, **kw)
                elif op == "pointwise_conv2d_grad_weight":
                    dwops.pointwise_conv2d_grad_weight(x, x, **kw)
                if op.startswith("pointwise"):
                    break  # no stride
    else:
        lay = "NLC" if layout == "NHWC" else "NCL"
        x = arr(2, L, C) if lay == "NLC" else arr(2, C, L)
        w, b = arr(C, 1, 4), arr(C)
        kw = dict(backend=backend)
        if op == "depthwise_conv1d":
            dwops.depthwise_conv1d(x, w, b, padding="causal", activation="silu", layout=lay, **kw)
        elif op == "depthwise_conv1d_backward":
            dwops.depthwise_conv1d_backward(x, x, w, padding="causal", layout=lay,
                                            need_bias=True, **kw)
        elif op == "depthwise_conv1d_update":
            dwops.depthwise_conv1d_update(arr(2, C), arr(2, C, 3), w, b, activation="silu", **kw)
    return time.perf_counter() - t0


def _job(args):
    op, dtype, layout, backend = args
    try:
        return args, warmup_job(op, dtype, layout, backend), None
    except Exception as exc:  # reported, not raised: one failure must not hide the rest
        return args, 0.0, f"{type(exc).__name__}: {exc}"


def warmup(ops=WARMUP_OPS, dtypes=("float32",), layouts=("NCHW", "NHWC"), backends=("cpu",),
           jobs: int | None = None, stream=None) -> list[tuple]:
    """Compile the kernels of ``ops`` x ``dtypes`` x ``layouts`` x ``backends`` in ``jobs``
    worker processes (default: the CPU count); returns ``[(job, seconds, error or None)]`` and
    prints one line per finished job on ``stream`` (stderr)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    out = stream or sys.stderr
    todo = [(op, dt, lay, be) for be in backends for op in ops for dt in dtypes for lay in layouts
            if not (op == "depthwise_conv1d_update" and lay == "NHWC")]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    done = []
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked Numba/threading state
    with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        for i, fut in enumerate(cf.as_completed([pool.submit(_job, t) for t in todo]), 1):
            (op, dt, lay, be), sec, err = fut.result()
            done.append(((op, dt, lay, be), sec, err))
            status = f"{sec:6.1f} s" if err is None else f"FAILED: {err}"
            print(f"[{i}/{len(todo)}] {be} {op} {dt} {lay}: {status}", file=out, flush=True)
    return done
