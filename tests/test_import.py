"""`import dwops` pulls in NumPy and nothing heavy (backends load lazily)."""

import subprocess
import sys

HEAVY = ("cupy", "numba", "torch", "jax", "tensorflow", "ml_dtypes")


def test_import_dwops_is_light():
    code = (
        "import sys, dwops, dwops.reference\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print(','.join(sorted(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import dwops imported: {out.stdout.strip()}"


def test_reference_call_stays_light():
    """Running the NumPy backend on float32 arrays imports no GPU or framework package."""
    code = (
        "import sys, numpy as np, dwops\n"
        "dwops.depthwise_conv2d(np.ones((1, 2, 5, 5), np.float32), np.ones((2, 1, 3, 3), np.float32),"
        " backend='numpy')\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('cupy', 'torch', 'jax', 'tensorflow') or m.startswith('numba.cuda'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
