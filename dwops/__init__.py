"""dwops: depthwise, pointwise (1x1) and depthwise-separable convolutions, forward and backward.

NumPy-compatible and framework-agnostic: pass NumPy, CuPy, PyTorch, JAX or any DLPack array and get
the same library's array back. ``import dwops`` imports NumPy and nothing heavier; backends load on
first use. The documentation (``docs/`` in the source tree) describes the behaviour: the guide,
the API reference, and the design page (``docs/design.md``: the contract of every function, how a
backend is chosen, how the kernels work and how they are checked).
"""

from . import reference
from ._api import (
    depthwise_conv1d,
    depthwise_conv1d_backward,
    depthwise_conv1d_update,
    depthwise_conv2d,
    depthwise_conv2d_backward,
    depthwise_conv2d_grad_input,
    depthwise_conv2d_grad_weight,
    pointwise_conv2d,
    pointwise_conv2d_grad_input,
    pointwise_conv2d_grad_weight,
    separable_conv2d,
)
from ._errors import BackendUnavailableError
from ._registry import BACKEND_NAMES, available as backend_available

def _version() -> str:
    """The installed distribution's version (pyproject.toml is its one source)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dwops")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "backend_available",
    "depthwise_conv1d",
    "depthwise_conv1d_backward",
    "depthwise_conv1d_update",
    "depthwise_conv2d",
    "depthwise_conv2d_backward",
    "depthwise_conv2d_grad_input",
    "depthwise_conv2d_grad_weight",
    "pointwise_conv2d",
    "pointwise_conv2d_grad_input",
    "pointwise_conv2d_grad_weight",
    "reference",
    "separable_conv2d",
]
