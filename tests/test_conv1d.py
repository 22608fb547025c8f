"""Depthwise 1-d: the reference against the loop oracle and PyTorch, the streaming contract (chunks,
decode steps, packed sequences) and the errors, on the host backends."""

from __future__ import annotations

import numpy as np
import pytest

import dwops
from dwops import reference
from tests import oracle
from tests.conftest import assert_close, rand

HOST_BACKENDS = ["numpy", "cpu"]

# (N, C, L, M, K, stride, dilation, padding)
GEOMETRIES = [
    (2, 3, 11, 1, 4, 1, 1, "causal"),
    (1, 2, 9, 2, 3, 1, 1, "same"),
    (2, 3, 13, 1, 5, 2, 1, "same"),
    (1, 4, 10, 1, 3, 1, 2, (2, 1)),
    (2, 1, 7, 3, 2, 3, 1, 1),
    (1, 2, 8, 1, 4, 1, 1, "valid"),
    (1, 3, 12, 1, 4, 2, 3, "causal"),
    (2, 2, 5, 1, 1, 1, 1, 0),
    (1, 2, 40, 1, 31, 1, 1, "same"),
]


def _pads(padding, length, k, s, d):
    if padding == "causal":
        return d * (k - 1), 0
    if padding == "valid":
        return 0, 0
    if padding == "same":
        out = -(-length // s)
        total = max((out - 1) * s + d * (k - 1) + 1 - length, 0)
        return total // 2, total - total // 2
    return (padding, padding) if isinstance(padding, int) else padding


def _to_layout(a, layout):
    return a if layout == "NCL" else np.ascontiguousarray(a.transpose(0, 2, 1))


def _from_layout(a, layout):
    return np.asarray(a) if layout == "NCL" else np.asarray(a).transpose(0, 2, 1)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_reference_matches_the_loop_oracle(rng, geometry, activation):
    n, c, length, m, k, s, d, padding = geometry
    x, w, b = rand(rng, (n, c, length), "float64"), rand(rng, (c * m, 1, k), "float64"), \
        rand(rng, (c * m,), "float64")
    y = reference.depthwise_conv1d(x, w, b, stride=s, dilation=d, padding=padding,
                                   activation=activation)
    want = oracle.depthwise_1d(x, w, b, s, d, _pads(padding, length, k, s, d), activation)
    assert_close(y, want, "float64")


def test_reference_state_and_seq_idx_match_the_loop_oracle(rng):
    n, c, length, k, d = 2, 3, 12, 4, 2
    x, w = rand(rng, (n, c, length), "float64"), rand(rng, (c, 1, k), "float64")
    state = rand(rng, (n, c, d * (k - 1)), "float64")
    seq = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1, 3, 3, 3], [5] * 6 + [6] * 6], np.int32)
    y = reference.depthwise_conv1d(x, w, padding="causal", dilation=d, initial_state=state,
                                   seq_idx=seq)
    assert_close(y, oracle.depthwise_1d(x, w, None, 1, d, (d * (k - 1), 0), None, state, seq),
                 "float64")


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_reference_matches_pytorch_forward_and_gradients(rng, geometry):
    torch = pytest.importorskip("torch", reason="PyTorch is the independent second oracle")
    F = torch.nn.functional
    n, c, length, m, k, s, d, padding = geometry
    x, w, b = rand(rng, (n, c, length), "float64"), rand(rng, (c * m, 1, k), "float64"), \
        rand(rng, (c * m,), "float64")
    pl, pr = _pads(padding, length, k, s, d)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = F.conv1d(F.pad(xt, (pl, pr)), wt, bt, stride=s, dilation=d, groups=c)
    g = rand(rng, tuple(yt.shape), "float64")
    yt.backward(torch.tensor(g))
    y = reference.depthwise_conv1d(x, w, b, stride=s, dilation=d, padding=padding)
    assert_close(y, yt.detach().numpy(), "float64")
    gx, gw, gb, gs = reference.depthwise_conv1d_backward(
        x, g, w, stride=s, dilation=d, padding=padding, need_bias=True)
    assert gs is None
    assert_close(gx, xt.grad.numpy(), "float64", what="grad_input")
    assert_close(gw, wt.grad.numpy(), "float64", what="grad_weight")
    assert_close(gb, bt.grad.numpy(), "float64", what="grad_bias")


@pytest.mark.parametrize("k", [*range(1, 9), 13, 31])
@pytest.mark.parametrize("padding", ["causal", "same", (3, 1)])
def test_every_width_matches_pytorch(rng, k, padding):
    torch = pytest.importorskip("torch", reason="PyTorch is the independent second oracle")
    F = torch.nn.functional
    d = 1 + (k % 2)
    n, c, length = 2, 3, 13 + d * (k - 1)
    x, w = rand(rng, (n, c, length), "float64"), rand(rng, (2 * c, 1, k), "float64")
    pl, pr = _pads(padding, length, k, 1, d)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    yt = F.conv1d(F.pad(xt, (pl, pr)), wt, dilation=d, groups=c)
    g = rand(rng, tuple(yt.shape), "float64")
    yt.backward(torch.tensor(g))
    y = reference.depthwise_conv1d(x, w, dilation=d, padding=padding)
    gx, gw, _, _ = reference.depthwise_conv1d_backward(x, g, w, dilation=d, padding=padding)
    assert_close(y, yt.detach().numpy(), "float64")
    assert_close(gx, xt.grad.numpy(), "float64", what="grad_input")
    assert_close(gw, wt.grad.numpy(), "float64", what="grad_weight")


def test_reference_initial_state_gradient_matches_pytorch(rng):
    torch = pytest.importorskip("torch", reason="PyTorch is the independent second oracle")
    n, c, length, k, d = 2, 3, 9, 3, 2
    x, w = rand(rng, (n, c, length), "float64"), rand(rng, (c, 1, k), "float64")
    state = rand(rng, (n, c, d * (k - 1)), "float64")
    xt, wt, st = (torch.tensor(a, requires_grad=True) for a in (x, w, state))
    yt = torch.nn.functional.conv1d(torch.cat([st, xt], 2), wt, dilation=d, groups=c)
    g = rand(rng, tuple(yt.shape), "float64")
    yt.backward(torch.tensor(g))
    gx, gw, gb, gs = reference.depthwise_conv1d_backward(
        x, g, w, dilation=d, padding="causal", initial_state=state, need_initial_state=True)
    assert gb is None
    for got, want, what in ((gx, xt.grad, "x"), (gw, wt.grad, "w"), (gs, st.grad, "state")):
        assert_close(got, want.numpy(), "float64", what=what)


# ----------------------------------------------------------------------------- every host backend


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunks_with_states_equal_one_call(rng, backend, layout, dtype):
    n, c, length, k, d = 2, 5, 23, 4, 1
    x, w, b = rand(rng, (n, c, length), dtype), rand(rng, (2 * c, 1, k), dtype), \
        rand(rng, (2 * c,), dtype)
    full = dwops.depthwise_conv1d(_to_layout(x, layout), w, b, padding="causal", layout=layout,
                                  activation="silu", backend=backend)
    pieces, state = [], None
    for lo, hi in ((0, 2), (2, 10), (10, 11), (11, 23)):
        y, state = dwops.depthwise_conv1d(_to_layout(x[:, :, lo:hi], layout), w, b,
                                          padding="causal", layout=layout, activation="silu",
                                          initial_state=state, return_final_state=True,
                                          backend=backend)
        assert state.shape == (n, c, k - 1)
        pieces.append(_from_layout(y, layout))
    np.testing.assert_array_equal(np.concatenate(pieces, axis=2).astype(np.float64),
                                  _from_layout(full, layout).astype(np.float64))
    np.testing.assert_array_equal(state.astype(np.float64), x[:, :, -(k - 1):].astype(np.float64))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_final_state_of_a_chunk_shorter_than_the_state(rng, backend):
    x, w = rand(rng, (1, 2, 2)), rand(rng, (2, 1, 4))
    state = rand(rng, (1, 2, 3))
    _, final = dwops.depthwise_conv1d(x, w, padding="causal", initial_state=state,
                                      return_final_state=True, backend=backend)
    np.testing.assert_array_equal(final, np.concatenate([state, x], axis=2)[:, :, -3:])
    _, final = dwops.depthwise_conv1d(x, w, padding="causal", return_final_state=True,
                                      backend=backend)
    np.testing.assert_array_equal(final[:, :, 0], 0.0)
    np.testing.assert_array_equal(final[:, :, 1:], x)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_steps_equal_the_full_convolution(rng, backend, tokens):
    n, c, m, k, length = 2, 3, 2, 4, 12
    x, w, b = rand(rng, (n, c, length)), rand(rng, (c * m, 1, k)), rand(rng, (c * m,))
    full = dwops.depthwise_conv1d(x, w, b, padding="causal", activation="silu", backend=backend)
    state = np.zeros((n, c, k - 1), np.float32)
    steps = []
    for t in range(0, length, tokens):
        step = x[:, :, t] if tokens == 1 else x[:, :, t:t + tokens]
        y, new_state = dwops.depthwise_conv1d_update(step, state, w, b, activation="silu",
                                                     backend=backend)
        assert new_state is state  # NumPy arrays are updated in place
        steps.append(y if tokens > 1 else y[:, :, None])
    assert_close(np.concatenate(steps, axis=2), full, "float32")
    np.testing.assert_array_equal(state, x[:, :, -(k - 1):])


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_decode_updates_a_torch_state_in_place_and_returns_torch(rng, backend):
    torch = pytest.importorskip("torch", reason="checks in-place update of a torch tensor")
    x, w = rand(rng, (2, 3)), rand(rng, (3, 1, 3))
    state = torch.tensor(rand(rng, (2, 3, 2)))
    noncontig = torch.tensor(rand(rng, (2, 2, 3))).transpose(1, 2)  # a view: written back
    want_y = (w[:, 0, 0] * state.numpy()[:, :, 0] + w[:, 0, 1] * state.numpy()[:, :, 1]
              + w[:, 0, 2] * x)
    y, new = dwops.depthwise_conv1d_update(torch.tensor(x), state, w, backend=backend)
    assert isinstance(y, torch.Tensor) and new is state
    assert_close(y.numpy(), want_y, "float32")
    np.testing.assert_array_equal(state[:, :, 1].numpy(), x)
    before = noncontig.clone()
    _, new = dwops.depthwise_conv1d_update(torch.tensor(x), noncontig, w, backend=backend)
    assert new is noncontig
    np.testing.assert_array_equal(noncontig[:, :, 0].numpy(), before[:, :, 1].numpy())
    np.testing.assert_array_equal(noncontig[:, :, 1].numpy(), x)


def test_decode_leaves_an_immutable_jax_state_and_returns_a_new_one(rng):
    jnp = pytest.importorskip("jax.numpy", reason="checks the immutable-state contract")
    x, w = rand(rng, (2, 3)), rand(rng, (3, 1, 3))
    state = jnp.asarray(rand(rng, (2, 3, 2)))
    before = np.asarray(state).copy()
    y, new = dwops.depthwise_conv1d_update(jnp.asarray(x), state, w)
    assert new is not state
    np.testing.assert_array_equal(np.asarray(state), before)
    np.testing.assert_array_equal(np.asarray(new)[:, :, 1], x)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("layout", ["NCL", "NLC"])
def test_packed_sequences_never_read_across_a_boundary(rng, backend, layout):
    k, bounds = 4, (0, 3, 4, 11, 17)
    x, w, b = rand(rng, (1, 3, 17)), rand(rng, (3, 1, k)), rand(rng, (3,))
    state = rand(rng, (1, 3, k - 1))
    seq = np.concatenate([np.full(hi - lo, i) for i, (lo, hi) in
                          enumerate(zip(bounds[:-1], bounds[1:]))])[None].astype(np.int64)
    y = _from_layout(dwops.depthwise_conv1d(_to_layout(x, layout), w, b, padding="causal",
                                            layout=layout, seq_idx=seq, initial_state=state,
                                            backend=backend), layout)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        alone = dwops.depthwise_conv1d(x[:, :, lo:hi], w, b, padding="causal",
                                       initial_state=state if i == 0 else None, backend=backend)
        # a tap read across a boundary would be off by ~|w x| ~ 0.1, far above the tolerance
        assert_close(y[:, :, lo:hi], alone, "float32", what=f"sequence {i}")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("need", [(True, False, False, False), (False, True, True, False),
                                  (True, True, True, True), (False, False, False, True)])
def test_backward_returns_exactly_what_is_asked(rng, backend, need):
    x, w, state = rand(rng, (2, 3, 9)), rand(rng, (6, 1, 3)), rand(rng, (2, 3, 2))
    g = rand(rng, (2, 6, 9))
    names = ("need_input", "need_weight", "need_bias", "need_initial_state")
    got = dwops.depthwise_conv1d_backward(x, g, w, padding="causal", initial_state=state,
                                          backend=backend, **dict(zip(names, need)))
    want = reference.depthwise_conv1d_backward(x, g, w, padding="causal", initial_state=state,
                                               need_bias=True, need_initial_state=True)
    for asked, a, e in zip(need, got, want):
        if asked:
            assert_close(a, e, "float32", scale=np.abs(e).max() + 1)
        else:
            assert a is None


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def arrays(rng):
    return {"x": rand(rng, (2, 3, 10)), "w": rand(rng, (6, 1, 4)), "s": rand(rng, (2, 3, 3)),
            "seq": np.zeros((2, 10), np.int32)}


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["numba", "cupy"])
@pytest.mark.parametrize("call, exc, pattern", [
    (lambda a, be: dwops.depthwise_conv1d(a["x"][0], a["w"], backend=be), ValueError,
     r"depthwise_conv1d: argument 'x' must be 3-d, got shape \(3, 10\)"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"][:, :, None], backend=be), ValueError,
     r"argument 'weight' must have shape \(C\*M, 1, K\), got \(6, 1, 1, 4\)"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"][:5], backend=be), ValueError,
     r"5 output channels, not a multiple of the 3 input channels"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], layout="NCHW", backend=be), ValueError,
     r"layout must be 'NCL' or 'NLC', got 'NCHW'"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], padding="full", backend=be),
     ValueError, r"padding string must be 'same', 'valid' or 'causal', got 'full'"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], padding=(1, -1), backend=be),
     ValueError, r"padding must be >= 0"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], stride=(1, 2), backend=be),
     ValueError, r"stride must be a positive int, got \(1, 2\)"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], dilation=0, backend=be),
     ValueError, r"dilation must be >= 1, got 0"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"][:, :, :2], a["w"], backend=be), ValueError,
     r"empty output: input length 2 with kernel 4"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], initial_state=a["s"], backend=be),
     ValueError, r"initial_state needs padding='causal'"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], padding="same",
                                          return_final_state=True, backend=be),
     ValueError, r"return_final_state needs padding='causal'"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], padding="causal",
                                          initial_state=a["s"][:, :, :2], backend=be),
     ValueError, r"argument 'initial_state' must have shape \(2, 3, 3\)"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], padding="causal",
                                          initial_state=a["s"].astype(np.float64), backend=be),
     TypeError, r"argument 'initial_state' has dtype float64 but 'x' has float32"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], padding="causal", stride=2,
                                          seq_idx=a["seq"], backend=be),
     ValueError, r"seq_idx needs padding='causal' and stride=1"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], padding="causal",
                                          seq_idx=a["seq"].astype(np.float32), backend=be),
     TypeError, r"argument 'seq_idx' must have dtype int32 or int64, got float32"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], padding="causal",
                                          seq_idx=a["seq"][:, :9], backend=be),
     ValueError, r"argument 'seq_idx' must have shape \(2, 10\)"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"], return_final_state=1, backend=be),
     ValueError, r"return_final_state must be True or False"),
    (lambda a, be: dwops.depthwise_conv1d_backward(a["x"], a["x"], a["w"][:3], padding="causal",
                                                   need_initial_state=True, backend=be),
     ValueError, r"need_initial_state=True needs the initial_state"),
    (lambda a, be: dwops.depthwise_conv1d_backward(a["x"], a["x"][:, :, :9], a["w"][:3],
                                                   padding="causal", backend=be),
     ValueError, r"argument 'grad_output' must have shape \(2, 3, 10\)"),
    (lambda a, be: dwops.depthwise_conv1d_update(a["x"], a["s"][:, :, :2], a["w"][:3],
                                                 backend=be),
     ValueError, r"depthwise_conv1d_update: argument 'state' must have shape \(2, 3, 3\)"),
    (lambda a, be: dwops.depthwise_conv1d_update(a["x"][0, 0], a["s"], a["w"][:3], backend=be),
     ValueError, r"argument 'x_step' must be \(N, C\) or \(N, C, T\)"),
    (lambda a, be: dwops.depthwise_conv1d_update(a["x"][:, :, 0], a["s"][:, :, :0],
                                                 a["w"][:3, :, :1], backend=be),
     ValueError, r"needs a kernel width >= 2"),
    (lambda a, be: dwops.depthwise_conv1d(a["x"], a["w"][:, :, :1], padding="causal",
                                          return_final_state=True, backend=be),
     ValueError, r"return_final_state needs a kernel that reaches back"),
])
def test_errors_name_the_function_and_argument(arrays, backend, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(arrays, backend)


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_a_decreasing_seq_idx_is_refused_before_anything_is_written(arrays, backend):
    seq = np.tile(np.arange(10, dtype=np.int32)[::-1], (2, 1))
    with pytest.raises(ValueError, match=r"'seq_idx' must be non-decreasing"):
        dwops.depthwise_conv1d(arrays["x"], arrays["w"], padding="causal", seq_idx=seq,
                               backend=backend)
    state = arrays["s"].copy()
    with pytest.raises(ValueError, match=r"argument 'bias' must have shape \(3,\)"):
        dwops.depthwise_conv1d_update(arrays["x"][:, :, 0], state, arrays["w"][:3],
                                      np.ones(4, np.float32), backend=backend)
    np.testing.assert_array_equal(state, arrays["s"])  # an error leaves the state untouched
