"""dwops.jax for the depthwise 1-d op: values, gradients against jax.lax.conv_general_dilated,
jit, both CPU routes (pure_callback and buffer_callback)."""

from __future__ import annotations

import numpy as np
import pytest

# Module-level: every test here calls dwops.jax, which imports JAX.
jax = pytest.importorskip("jax", reason="dwops.jax needs JAX")

import jax.numpy as jnp  # noqa: E402

import dwops.jax as dj  # noqa: E402
from tests.conftest import assert_close, rand  # noqa: E402


@pytest.fixture(params=["pure", "buffer"])
def route(request, monkeypatch):
    monkeypatch.setattr(dj, "_CPU_ROUTE", request.param)
    return request.param


def _lax_conv1d(x, w, b, stride, dilation, pads, layout, state=None):
    """The same convolution by jax.lax.conv_general_dilated (feature_group_count=C)."""
    xc = x if layout == "NCL" else jnp.swapaxes(x, 1, 2)
    if state is not None:
        xc = jnp.concatenate([state, xc], axis=2)
        pads = (0, pads[1])
    y = jax.lax.conv_general_dilated(xc, w, (stride,), [pads], rhs_dilation=(dilation,),
                                     dimension_numbers=("NCH", "OIH", "NCH"),
                                     feature_group_count=xc.shape[1])
    if b is not None:
        y = y + b[None, :, None]
    return y if layout == "NCL" else jnp.swapaxes(y, 1, 2)


CASES = [  # (N, C, L, M, K, stride, dilation, padding, pads, layout)
    (2, 3, 11, 1, 4, 1, 1, "causal", (3, 0), "NCL"),
    (1, 2, 9, 2, 3, 2, 1, (1, 2), (1, 2), "NLC"),
    (2, 2, 10, 1, 3, 1, 2, "valid", (0, 0), "NCL"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_values_and_gradients_match_lax(rng, route, case, backend="cpu"):
    n, c, length, m, k, s, d, padding, pads, layout = case
    shape = (n, c, length) if layout == "NCL" else (n, length, c)
    x, w, b = rand(rng, shape), rand(rng, (c * m, 1, k)), rand(rng, (c * m,))
    g = rand(rng, np.asarray(_lax_conv1d(x, w, b, s, d, pads, layout)).shape)

    def ours(x, w, b):
        y = dj.depthwise_conv1d(x, w, b, stride=s, dilation=d, padding=padding, layout=layout,
                                backend=backend)
        return (y * g).sum()

    def theirs(x, w, b):
        return (_lax_conv1d(x, w, b, s, d, pads, layout) * g).sum()

    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(x, w, b)
    want = jax.value_and_grad(theirs, argnums=(0, 1, 2))(x, w, b)
    assert_close(got[0], want[0], "float32", scale=np.abs(g).sum())
    for a, e, what in zip(got[1], want[1], ("x", "w", "b")):
        assert_close(a, e, "float32", scale=np.abs(e).max() + 1, what=what)


def test_state_gradients_and_final_state_match_lax(rng, route, backend="cpu"):
    n, c, length, k = 2, 3, 9, 4
    x, w, state = rand(rng, (n, c, length)), rand(rng, (c, 1, k)), rand(rng, (n, c, k - 1))

    def ours(x, w, state):
        y, final = dj.depthwise_conv1d(x, w, padding="causal", initial_state=state,
                                       return_final_state=True, activation="silu",
                                       backend=backend)
        return (y ** 2).sum() + (final * 3).sum()

    def theirs(x, w, state):
        y = jax.nn.silu(_lax_conv1d(x, w, None, 1, 1, (k - 1, 0), "NCL", state))
        final = jnp.concatenate([state, x], axis=2)[:, :, -(k - 1):]
        return (y ** 2).sum() + (final * 3).sum()

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, w, state)
    want = jax.grad(theirs, argnums=(0, 1, 2))(x, w, state)
    for a, e, what in zip(got, want, ("x", "w", "state")):
        assert_close(a, e, "float32", scale=np.abs(e).max() + 1, what=what)


def test_seq_idx_under_jit(rng, route):
    x, w = rand(rng, (1, 2, 8)), rand(rng, (2, 1, 3))
    seq = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]], jnp.int32)
    y = jax.jit(lambda x, w, s: dj.depthwise_conv1d(x, w, padding="causal", seq_idx=s))(x, w, seq)
    first = dj.depthwise_conv1d(x[:, :, :3], w, padding="causal")
    second = dj.depthwise_conv1d(x[:, :, 3:], w, padding="causal")
    assert_close(np.asarray(y), np.concatenate([first, second], axis=2), "float32")
    gx = jax.grad(lambda x: dj.depthwise_conv1d(x, w, padding="causal", seq_idx=seq).sum())(x)
    assert gx.shape == x.shape


def test_errors_at_trace_time(rng):
    x, w = rand(rng, (1, 2, 8)), rand(rng, (2, 1, 3))
    with pytest.raises(ValueError, match="initial_state needs padding='causal'"):
        jax.jit(lambda x: dj.depthwise_conv1d(x, w, initial_state=jnp.zeros((1, 2, 2))))(x)
