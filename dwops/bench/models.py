"""``--suite models``: whole torchvision networks, original against :func:`dwops.torch.convert`.

Two rows per network and backend, in the JSON schema of the other suites:

* ``inference`` (``direction``): the forward pass in eval mode, the original network (baseline
  ``torch``) against ``convert(model, fuse=True)`` (depthwise layers, fused separable chains);
* ``training``: forward and backward in train mode, the original against ``convert(model)``.

``op`` is the network's name, ``shape`` the input (``KH``, ``KW``, ``stride``, ``padding`` null;
``C_out`` the classes), ``bytes`` the input, parameters and output counted once (a lower bound:
the activations in between are not counted, so ``roofline_fraction`` is null). Sizes: batch 2 at
64x64 on a CPU (the suite stays within minutes on two cores), batch 32 at 224x224 on a GPU. Random
weights (nothing is downloaded), BatchNorm statistics randomized.

Correctness gate, per row: the converted network's output is compared with the original's run in
float64; its error relative to the output's magnitude may be at most 4x the original's own float32
error plus 4 float32 epsilons (the whole-network rule of ``tests/test_convert.py``).
``max_rel_err`` is the converted network's error against the original in float32.
"""

from __future__ import annotations

import copy
import statistics

NETWORKS = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0",
            "convnext_tiny")
CPU_INPUT = (2, 64)
GPU_INPUT = (32, 224)
NUM_CLASSES = 1000


def _build(name: str):
    import torch
    from torchvision import models
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(models, name)(weights=None, num_classes=NUM_CLASSES)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _gate(model, converted, x, train: bool) -> tuple[float, str | None]:
    """(max relative error against the original in float32, problem or None)."""
    import torch
    with torch.no_grad():
        torch.manual_seed(0)
        y64 = copy.deepcopy(model).double()(x.double())
        torch.manual_seed(0)
        theirs = copy.deepcopy(model)(x).double()
        torch.manual_seed(0)
        ours = copy.deepcopy(converted)(x).double()
    scale = y64.abs().max()
    e_ours = float((ours - y64).abs().max() / scale)
    e_theirs = float((theirs - y64).abs().max() / scale)
    eps = torch.finfo(torch.float32).eps
    problem = None
    if not e_ours <= 4 * e_theirs + 4 * eps:
        problem = (f"error {e_ours:.2e} against float64 exceeds 4x PyTorch's {e_theirs:.2e} "
                   f"+ 4 eps")
    return float((ours - theirs).abs().max() / theirs.abs().max()), problem


def run(outcome, device, backends, timing: dict, remaining, progress=None) -> None:
    """Measure every network on ``device`` and append its rows to ``outcome``."""
    try:
        import torch
        import torch.nn.functional as F
        import torchvision  # noqa: F401

        import dwops.torch as dt
    except ImportError as exc:
        outcome.notes.append(f"models suite skipped: {exc} (pip install 'dwops[models]')")
        return
    n, size = GPU_INPUT if device.on_gpu else CPU_INPUT
    tdev = "cuda" if device.on_gpu else "cpu"
    for name in NETWORKS:
        if remaining() is not None and remaining() <= 0:
            outcome.skipped += len(backends) * 2
            continue
        model = _build(name).to(tdev)
        x = torch.rand(n, 3, size, size, device=tdev) * 2 - 1
        target = torch.randint(0, NUM_CLASSES, (n,), device=tdev)
        params = sum(p.numel() for p in model.parameters())
        nbytes = 4 * (x.numel() + params + n * NUM_CLASSES)
        shape = {"N": n, "C": 3, "H": size, "W": size, "KH": None, "KW": None, "stride": None,
                 "padding": None, "C_out": NUM_CLASSES}

        def infer(net):
            def fn():
                with torch.no_grad():
                    net(x)
            return fn

        def train(net):
            def fn():
                net.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), target).backward()
            return fn

        for direction in ("inference", "training"):
            is_train = direction == "training"
            orig = model.train(is_train)
            label = f"models/{name} {direction}"
            try:
                make = train if is_train else infer
                base_ms = float(statistics.median(device.time(make(orig), **timing)))
            except Exception as exc:  # noqa: BLE001 - a baseline failing is reported
                outcome.notes.append(f"{label}: torch baseline failed: {exc!r}")
                base_ms = None
            for backend in backends:
                try:
                    conv = dt.convert(orig, fuse=not is_train, backend=backend)
                    err, problem = _gate(orig, conv, x, is_train)
                    ms = float(statistics.median(device.time(make(conv), **timing)))
                except Exception as exc:  # noqa: BLE001 - a dwops error fails the run
                    outcome.failures.append(f"{label} {backend}: {type(exc).__name__}: {exc}")
                    continue
                if problem:
                    outcome.failures.append(f"{label} {backend}: {problem}")
                outcome.result["rows"].append({
                    "op": name, "direction": direction, "suite": "models", "shape": shape,
                    "dtype": "float32", "layout": "NCHW", "backend": backend, "ms": ms,
                    "bytes": int(nbytes), "roofline_fraction": None,
                    "baselines": {"torch": base_ms} if base_ms else {},
                    "speedup_vs_torch": base_ms / ms if base_ms else None,
                    "max_rel_err": err,
                })
                if progress is not None:
                    progress.note(f"{label} {backend}: {ms:.1f} ms (torch {base_ms or 0:.1f} ms)")
