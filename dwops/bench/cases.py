"""Benchmark cases and the suites that list them.

A :class:`Case` is one problem (op, shape, dtype) measured in every layout, direction and backend the
runner is asked for. Suites are lists of cases in priority order; when a time budget runs out, the
runner skips the rest, so each suite puts its most telling cases first (float32 before the 16-bit
types, the motivating block before the network layers).

Shapes (``K`` = depthwise kernel side, padding ``K // 2`` as in the PyTorch models, so PyTorch and
JAX run exactly the same problem):

* MobileNetV2 (224x224 input): the 3x3 depthwise layers of its 17 inverted-residual blocks, deduplicated;
* EfficientNet-B0: its 3x3 and 5x5 depthwise layers, deduplicated;
* ConvNeXt-T: the 7x7 depthwise layers of its first three stages (56, 28, 14);
* RepLKNet-style: ``(64, 384, R, R)`` with ``R`` in {16, 32} and ``K`` in {7, 13, 31};
* the motivating block ``x + pw(relu(dw3x3(x))) + b`` with ``C = 64`` at 112x112 and 56x56;
* pointwise (1x1) layers of those networks;
* ``conv1d``: the short causal depthwise 1-d convolution of Mamba-style sequence models
  (``K = 4``, bias and SiLU fused, ``(N, C, L)`` with ``C`` 2048-12288 and ``L`` 2k-16k on a GPU),
  forward and the one-pass backward (``grad_input``, ``grad_weight`` and ``grad_bias``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

OPS = ("depthwise", "pointwise", "block", "block_unfused", "conv1d")
DIRECTIONS = ("forward", "grad_input", "grad_weight")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Case:
    """One problem. ``op`` is ``depthwise`` (``C -> C``, ``K x K``, ``stride``), ``pointwise``
    (``C -> C_out``), ``block`` (fused ``separable_conv2d``: dw ``K x K`` + ReLU, 1x1 ``C -> C``,
    bias, residual ``x``), ``block_unfused`` (the same block as a depthwise call then a pointwise
    call, each with its epilogue fused) or ``conv1d`` (causal depthwise 1-d, ``x`` ``(N, C, L)``
    stored as ``H = 1``, ``W = L``, width ``K``, bias and SiLU; directions ``forward`` and
    ``backward``)."""

    suite: str
    op: str
    N: int
    C: int
    H: int
    W: int
    K: int = 1
    stride: int = 1
    C_out: int | None = None  # pointwise / block output channels; None = C
    dtype: str = "float32"
    directions: tuple = ("forward",)
    label: str = ""  # the layer's name in its network, for tables and plots

    @property
    def CO(self) -> int:
        return self.C if self.C_out is None else self.C_out

    @property
    def padding(self) -> int:
        return self.K // 2

    @property
    def L(self) -> int:
        return self.W

    @property
    def OH(self) -> int:
        if self.op == "conv1d":
            return 1
        return (self.H + 2 * self.padding - self.K) // self.stride + 1

    @property
    def OW(self) -> int:
        if self.op == "conv1d":  # causal, stride 1
            return self.W
        return (self.W + 2 * self.padding - self.K) // self.stride + 1

    def layout_name(self, layout: str) -> str:
        """The row's layout: ``NCL``/``NLC`` for 1-d cases (measured as ``NCHW``/``NHWC``)."""
        if self.op == "conv1d":
            return {"NCHW": "NCL", "NHWC": "NLC"}[layout]
        return layout

    def shape(self) -> dict:
        """The ``shape`` entry of a JSON row."""
        if self.op == "conv1d":
            return {"N": self.N, "C": self.C, "L": self.L, "K": self.K, "stride": 1,
                    "padding": "causal", "C_out": self.CO}
        return {"N": self.N, "C": self.C, "H": self.H, "W": self.W, "KH": self.K, "KW": self.K,
                "stride": self.stride, "padding": self.padding, "C_out": self.CO}

    def shape_str(self) -> str:
        if self.op == "conv1d":
            return f"{self.N}x{self.C}x{self.L} k{self.K} causal"
        s = f"{self.N}x{self.C}x{self.H}x{self.W}"
        if self.op == "pointwise":
            return s + f"->{self.CO}"
        s += f" k{self.K}"
        if self.stride != 1:
            s += f" s{self.stride}"
        return s

    def nbytes(self, direction: str) -> int:
        """Bytes that must move through memory: every input read once, every output written once."""
        item = 2 if self.dtype in ("float16", "bfloat16") else (8 if self.dtype == "float64" else 4)
        x = self.N * self.C * self.H * self.W
        y = self.N * self.CO * self.OH * self.OW
        if self.op == "conv1d":  # forward: x, w, b -> y; backward: x, gy, w -> gx, gw, gb
            params = self.C * self.K + self.C
            return item * (x + y + params) if direction == "forward" else \
                item * (3 * x + 2 * params)
        if self.op == "depthwise":
            w = self.C * self.K * self.K
            return item * (x + w + y)  # forward: x, w -> y; grad_input: gy, w -> gx; grad_weight: x, gy -> gw
        if self.op == "pointwise":
            return item * (x + self.CO * self.C + y)
        # block: x read once (it is also the residual), dw weights, pw weights, bias, y written once
        return item * (x + self.C * self.K * self.K + self.CO * self.C + self.CO + y)

    def flops(self, direction: str) -> int:
        """Multiply-adds times two (for the record; these ops are memory-bound)."""
        y = self.N * self.CO * self.OH * self.OW
        if self.op == "conv1d":
            return 2 * y * self.K * (1 if direction == "forward" else 2)
        if self.op == "depthwise":
            return 2 * y * self.K * self.K
        if self.op == "pointwise":
            return 2 * y * self.C
        return 2 * self.N * self.C * self.OH * self.OW * self.K * self.K + 2 * y * self.C

    def scaled(self, batch: int | None = None, max_size: int | None = None) -> "Case":
        """The same case with the batch replaced and H, W capped (for quick runs and tests; the
        length of a 1-d case is capped at ``max_size**2``)."""
        c = self
        if batch is not None:
            c = replace(c, N=batch)
        if max_size is not None:
            if c.op == "conv1d":  # L capped at max_size**2: as many positions as an image
                c = replace(c, W=min(c.W, max_size * max_size))
            else:
                c = replace(c, H=min(c.H, max_size), W=min(c.W, max_size))
        return c


# ----------------------------------------------------------------------------- layer tables
# (label, C, H, K, stride): the depthwise layers at a 224x224 input.
MOBILENET_V2 = [
    ("b1", 32, 112, 3, 1), ("b2", 96, 112, 3, 2), ("b3", 144, 56, 3, 1), ("b4", 144, 56, 3, 2),
    ("b5", 192, 28, 3, 1), ("b7", 192, 28, 3, 2), ("b8", 384, 14, 3, 1), ("b12", 576, 14, 3, 1),
    ("b14", 576, 14, 3, 2), ("b15", 960, 7, 3, 1),
]
EFFICIENTNET_B0 = [
    ("s1", 32, 112, 3, 1), ("s2a", 96, 112, 3, 2), ("s2b", 144, 56, 3, 1), ("s3a", 144, 56, 5, 2),
    ("s3b", 240, 28, 5, 1), ("s4a", 240, 28, 3, 2), ("s4b", 480, 14, 3, 1), ("s5a", 480, 14, 5, 1),
    ("s5b", 672, 14, 5, 1), ("s6a", 672, 14, 5, 2), ("s6b", 1152, 7, 5, 1), ("s7", 1152, 7, 3, 1),
]
CONVNEXT_T = [("stage1", 96, 56, 7, 1), ("stage2", 192, 28, 7, 1), ("stage3", 384, 14, 7, 1)]
REPLKNET = [(f"R{r}k{k}", 384, r, k, 1) for r in (32, 16) for k in (7, 13, 31)]
# (label, C_in, C_out, H): 1x1 layers (expansion and projection) of the networks above.
POINTWISE = [
    ("block 64->64 @112", 64, 64, 112), ("block 64->64 @56", 64, 64, 56),
    ("mbv2 expand 24->144", 24, 144, 56), ("mbv2 project 144->24", 144, 24, 56),
    ("mbv2 expand 32->192", 32, 192, 28), ("mbv2 project 192->32", 192, 32, 28),
    ("mbv2 expand 64->384", 64, 384, 14), ("mbv2 project 576->96", 576, 96, 14),
    ("mbv2 expand 160->960", 160, 960, 7), ("mbv2 head 320->1280", 320, 1280, 7),
    ("convnext 96->384", 96, 384, 56), ("convnext 384->96", 384, 96, 56),
    ("convnext 192->768", 192, 768, 28),
]

GPU_BATCH = 64
# (label, N, C, L): Mamba-style sequence layers (d_inner, or the xBC width of Mamba-2).
CONV1D_GPU = [
    ("C2048 L2k", 8, 2048, 2048), ("C4096 L4k", 4, 4096, 4096), ("C8192 L8k", 2, 8192, 8192),
    ("C12288 L16k", 1, 12288, 16384),
]
CONV1D_CPU = [("C1024 L2k", 2, 1024, 2048), ("C2048 L4k", 1, 2048, 4096)]
CONV1D_K = 4


def _depthwise_suite(suite, table, dtype, batch=GPU_BATCH):
    return [Case(suite, "depthwise", batch, c, h, h, k, s, None, dtype, DIRECTIONS, label)
            for label, c, h, k, s in table]


def _block_suite(dtype, batch=GPU_BATCH, sizes=(112, 56)):
    out = []
    for h in sizes:
        for op in ("block", "block_unfused"):
            out.append(Case("block", op, batch, 64, h, h, 3, 1, 64, dtype, ("forward",),
                            f"block @{h}"))
    return out


def _pointwise_suite(dtype, batch=GPU_BATCH):
    return [Case("pointwise", "pointwise", batch, ci, h, h, 1, 1, co, dtype, ("forward",), label)
            for label, ci, co, h in POINTWISE]


def conv1d_suite(dtype: str, on_gpu: bool) -> list[Case]:
    """``--suite conv1d``: Mamba-style causal width-4 convolutions, forward and backward."""
    table = CONV1D_GPU if on_gpu else CONV1D_CPU
    return [Case("conv1d", "conv1d", n, c, 1, length, CONV1D_K, 1, None, dtype,
                 ("forward", "backward"), label) for label, n, c, length in table]


GPU_SUITES = ("block", "conv1d", "mobilenetv2", "efficientnet_b0", "convnext", "replknet",
              "pointwise")


def gpu_suite(name: str, dtype: str) -> list[Case]:
    """The cases of one GPU suite in one dtype."""
    if name == "block":
        return _block_suite(dtype)
    if name == "mobilenetv2":
        return _depthwise_suite(name, MOBILENET_V2, dtype)
    if name == "efficientnet_b0":
        return _depthwise_suite(name, EFFICIENTNET_B0, dtype)
    if name == "convnext":
        return _depthwise_suite(name, CONVNEXT_T, dtype)
    if name == "replknet":
        return _depthwise_suite(name, REPLKNET, dtype)
    if name == "pointwise":
        return _pointwise_suite(dtype)
    if name == "conv1d":
        return conv1d_suite(dtype, on_gpu=True)
    raise KeyError(name)


def default_suite(on_gpu: bool) -> list[Case]:
    """The embedded default (``python -m dwops bench``): the motivating block and the plain depthwise
    forward of the same layer; N=16 at 56x56 on a CPU (under a minute on two cores), N=64 at
    112x112 on a GPU."""
    n, h = (GPU_BATCH, 112) if on_gpu else (16, 56)
    dtypes = ("float32", "bfloat16") if on_gpu else ("float32",)
    out = []
    for dtype in dtypes:
        out.append(Case("default", "block", n, 64, h, h, 3, 1, 64, dtype, ("forward",),
                        "x + pw(relu(dw3x3(x))) + b"))
        out.append(Case("default", "depthwise", n, 64, h, h, 3, 1, None, dtype, ("forward",),
                        "dw3x3"))
    return out


def cpu_suite() -> list[Case]:
    """``--suite cpu``: the ``cpu`` backend against PyTorch CPU, shapes sized for a two-core machine."""
    s = "cpu"
    return [
        Case(s, "block", 16, 64, 56, 56, 3, 1, 64, "float32", ("forward",), "motivating block"),
        Case(s, "block_unfused", 16, 64, 56, 56, 3, 1, 64, "float32", ("forward",),
             "motivating block"),
        Case(s, "depthwise", 16, 64, 56, 56, 3, 1, None, "float32", DIRECTIONS, "block dw3x3"),
        Case(s, "depthwise", 8, 144, 56, 56, 3, 2, None, "float32", DIRECTIONS, "mbv2 b4"),
        Case(s, "depthwise", 8, 240, 28, 28, 5, 1, None, "float32", DIRECTIONS, "effnet s3b"),
        Case(s, "depthwise", 4, 96, 56, 56, 7, 1, None, "float32", DIRECTIONS, "convnext stage1"),
        Case(s, "pointwise", 16, 64, 56, 56, 1, 1, 64, "float32", ("forward",), "block 64->64"),
        Case(s, "pointwise", 8, 24, 56, 56, 1, 1, 144, "float32", ("forward",),
             "mbv2 expand 24->144"),
    ]


SUITE_NAMES = ("default", "cpu", "gpu") + GPU_SUITES + ("models",)


def suite(name: str, on_gpu: bool, dtypes=None) -> list[Case]:
    """Cases of a suite by name. ``gpu`` is every GPU suite, float32 first, then bfloat16, then
    float16, so a time budget drops the 16-bit repeats before any float32 shape."""
    if name == "default":
        cases = default_suite(on_gpu)
    elif name == "cpu":
        cases = cpu_suite()
    elif name == "gpu":
        cases = [c for dt in DTYPES for s in GPU_SUITES for c in gpu_suite(s, dt)]
    elif name == "conv1d":
        cases = [c for dt in ("float32", "bfloat16") for c in conv1d_suite(dt, on_gpu)]
    elif name == "models":  # whole networks, measured by dwops.bench.models (no op cases)
        cases = []
    elif name in GPU_SUITES:
        cases = [c for dt in DTYPES for c in gpu_suite(name, dt)]
    else:
        raise KeyError(f"unknown suite {name!r}; choose from {', '.join(SUITE_NAMES)}")
    if dtypes:  # the same shapes in the dtypes asked for, in the order asked
        seen, out = set(), []
        for d in dtypes:
            for c in cases:
                c = replace(c, dtype=d)
                if c not in seen:
                    seen.add(c)
                    out.append(c)
        cases = out
    return cases
