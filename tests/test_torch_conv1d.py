"""dwops.torch for the depthwise 1-d op: gradcheck (incl. initial_state and the final state),
torch.compile, the module and its nn.Conv1d state dict, decode steps."""

from __future__ import annotations

import numpy as np
import pytest

# Module-level: every test here calls dwops.torch, which imports PyTorch.
torch = pytest.importorskip("torch", reason="dwops.torch needs PyTorch")

import dwops.torch as dt  # noqa: E402
from tests.conftest import assert_close, rand  # noqa: E402

HOST_BACKENDS = ["numpy", "cpu"]

CASES = [  # (N, C, L, M, K, stride, dilation, padding, layout, activation)
    (2, 3, 11, 1, 4, 1, 1, "causal", "NCL", "silu"),
    (1, 2, 9, 2, 3, 2, 1, "same", "NLC", "gelu"),
    (2, 2, 10, 1, 3, 1, 2, (2, 1), "NCL", "relu"),
    (1, 3, 8, 1, 5, 3, 1, "valid", "NLC", None),
]


def _t(rng, shape):
    return torch.tensor(rand(rng, shape, "float64"), requires_grad=True)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck(rng, backend, case):
    n, c, length, m, k, s, d, padding, layout, act = case
    x = _t(rng, (n, c, length) if layout == "NCL" else (n, length, c))
    w, b = _t(rng, (c * m, 1, k)), _t(rng, (c * m,))
    kw = dict(stride=s, dilation=d, padding=padding, layout=layout, activation=act,
              backend=backend)
    assert torch.autograd.gradcheck(lambda *a: dt.depthwise_conv1d(*a, **kw), (x, w, b))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_gradcheck_through_initial_and_final_state_and_seq_idx(rng, backend, layout):
    n, c, length, k = 2, 3, 9, 3
    x = _t(rng, (n, c, length) if layout == "NCL" else (n, length, c))
    w, b, state = _t(rng, (c, 1, k)), _t(rng, (c,)), _t(rng, (n, c, k - 1))
    seq = torch.tensor([[0] * 4 + [1] * 5, [2] * 9], dtype=torch.int32)

    def f(x, w, b, state):
        y, final = dt.depthwise_conv1d(x, w, b, padding="causal", layout=layout,
                                       activation="silu", initial_state=state, seq_idx=seq,
                                       return_final_state=True, backend=backend)
        return y, final

    assert torch.autograd.gradcheck(f, (x, w, b, state))


def test_values_match_nn_conv1d_and_state_dict_loads(rng):
    conv = torch.nn.Conv1d(4, 8, 5, padding=2, groups=4)
    mod = dt.DepthwiseConv1d(4, 5, padding=2, multiplier=2)
    mod.load_state_dict(conv.state_dict())
    x = torch.tensor(rand(rng, (2, 4, 17)))
    assert_close(mod(x).detach().numpy(), conv(x).detach().numpy(), "float32",
                 scale=np.abs(conv(x).detach().numpy()).max())
    assert "kernel_size=5" in repr(mod)


def test_causal_module_streams_in_chunks_and_decodes(rng):
    mod = dt.DepthwiseConv1d(6, 4, causal=True, activation="silu")
    x = torch.tensor(rand(rng, (2, 6, 20)))
    with torch.no_grad():
        full = mod(x)
        y1, state = mod(x[:, :, :7], return_final_state=True)
        y2, state = mod(x[:, :, 7:15], initial_state=state, return_final_state=True)
        steps = []
        for t in range(15, 20):
            y, same = mod.step(x[:, :, t], state)
            assert same is state
            steps.append(y[:, :, None])
    got = torch.cat([y1, y2, *steps], dim=2)
    assert_close(got.numpy(), full.numpy(), "float32")


def test_module_rejects_causal_with_another_padding():
    with pytest.raises(ValueError, match="causal=True sets the padding"):
        dt.DepthwiseConv1d(4, 3, padding=1, causal=True)
    with pytest.raises(ValueError, match="layout must be 'NCL' or 'NLC'"):
        dt.DepthwiseConv1d(4, 3, layout="NCHW")


def test_compile_fullgraph_forward_and_backward(rng):
    x = torch.tensor(rand(rng, (2, 4, 16)), requires_grad=True)
    w = torch.tensor(rand(rng, (4, 1, 4)), requires_grad=True)
    state = torch.tensor(rand(rng, (2, 4, 3)), requires_grad=True)

    def f(x, w, state):
        y, final = dt.depthwise_conv1d(x, w, padding="causal", activation="silu",
                                       initial_state=state, return_final_state=True)
        return y.square().sum() + final.sum()

    loss = f(x, w, state)
    grads = torch.autograd.grad(loss, (x, w, state))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, w, state)
    grads_c = torch.autograd.grad(loss_c, (x, w, state))
    assert torch.allclose(loss, loss_c)
    for g, gc in zip(grads, grads_c):
        assert torch.equal(g, gc)


def test_opcheck_of_the_custom_ops(rng):
    x, w = torch.tensor(rand(rng, (2, 3, 9))), torch.tensor(rand(rng, (3, 1, 3)))
    state = torch.tensor(rand(rng, (2, 3, 2)))
    args = (x, w, None, state, None, 1, [0, 0], "causal", 1, "NCL", "silu", "auto")
    torch.library.opcheck(torch.ops.dwops.depthwise_conv1d, args,
                          test_utils=("test_schema", "test_faketensor"))
    g = torch.tensor(rand(rng, (2, 3, 9)))
    args = (x, g, w, state, None, 1, [0, 0], "causal", 1, "NCL", [True, True, False, True], "auto")
    torch.library.opcheck(torch.ops.dwops.depthwise_conv1d_backward, args,
                          test_utils=("test_schema", "test_faketensor"))
