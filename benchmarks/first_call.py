"""The cold first call of every public op on the ``cpu`` backend, in a fresh process.

    python benchmarks/first_call.py [--layout NCHW,NHWC] [--dtype float32] [--out FILE.md]

For each op: a new interpreter with an empty Numba cache (``NUMBA_CACHE_DIR`` set to a new
directory) imports dwops and makes one small call (stride 1; a bias and an activation where the op
takes them): **cold** is what a user waits the very first time. A second new interpreter with the
same, now filled, cache does the same: **cached** is every later first call of a process. Both
include the import of dwops. Prints a markdown table; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SNIPPET = (
    "import sys, time\n"
    "t = time.perf_counter()\n"
    "from dwops._jit import warmup_job\n"
    "warmup_job(sys.argv[1], sys.argv[2], sys.argv[3], 'cpu', strides=(1,))\n"
    "print(time.perf_counter() - t)\n"
)


def one(op: str, dtype: str, layout: str, cache: str) -> float:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, DWOPS_QUIET="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-c", SNIPPET, op, dtype, layout], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{op} {dtype} {layout}: {done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def main(argv=None) -> int:
    sys.path.insert(0, ROOT)
    from dwops import __version__
    from dwops._jit import WARMUP_OPS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", default="NCHW")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--op", default=",".join(WARMUP_OPS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import numba

    lines = [f"dwops {__version__}, numba {numba.__version__}, Python {platform.python_version()}, "
             f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d', time.gmtime())}", "",
             "| op | dtype | layout | cold first call (s) | cached first call (s) |",
             "|---|---|---|---:|---:|"]
    print("\n".join(lines), flush=True)
    for op in args.op.split(","):
        for dtype in args.dtype.split(","):
            for layout in args.layout.split(","):
                if op == "depthwise_conv1d_update" and layout == "NHWC":
                    continue
                with tempfile.TemporaryDirectory(prefix="dwops-numba-cache-") as cache:
                    cold = one(op, dtype, layout, cache)
                    warm = one(op, dtype, layout, cache)
                lay = {"NCHW": "NCL", "NHWC": "NLC"}[layout] if "conv1d" in op else layout
                lines.append(f"| {op} | {dtype} | {lay} | {cold:.1f} | {warm:.1f} |")
                print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
