"""Numba CUDA depthwise 1-d kernels: forward, one-pass backward (stage 1 of the weight and bias
gradients), final state, decode update, and the seq_idx order check.

Math (``M`` = channel multiplier, ``o`` an output channel, ``c = o // M`` its input channel,
``W = d*(K-1)``, ``xp`` the input with ``pl`` values on the left (zeros, or ``initial_state`` for
causal padding; then ``xp[q] = state[q]`` for ``q < pl = W``) and zeros on the right)::

    forward      y[n, o, l]   = act(bias[o] + sum_k w[o, k] * xp[n, c, l*s + k*d] * m[n, l, k])
    grad_xp      gxp[n, c, q] = sum_{m, k} w[c*M + m, k] * gy[n, c*M + m, l] * m[n, l, k]
                                over l = (q - k*d) / s exact, 0 <= l < OL
                 (grad_input = gxp[pl : pl + L], grad_initial_state = gxp[: pl])
    grad_weight  gw[o, k]     = sum_{n, l} gy[n, o, l] * xp[n, c, l*s + k*d] * m[n, l, k]
    grad_bias    gb[o]        = sum_{n, l} gy[n, o, l]

``m[n, l, k]`` (``seq_idx``, causal and stride 1 only) is 1 when the source position
``src = l - (K-1-k)*d`` belongs to the sequence of ``l`` (``src < 0`` counts as position 0) and 0
otherwise: a masked tap is skipped, never read.

Layouts and tiles (256 threads per block):

* NCL: a block owns one ``(n, c)`` row and a tile of ``tl`` (at most 1024) outputs. It stages the
  tile's input span ``(tl-1)*s + W + 1`` (the dilated halo zero-filled, or read from
  ``initial_state``) in dynamic shared memory with coalesced loads, then loops over the ``M``
  output channels of ``c``: each thread computes every 256-th output of the tile (consecutive
  lanes read consecutive shared words) with the weights of the specialized widths in registers.
  When the span does not fit the shared-memory budget even at 32 outputs per tile (huge
  dilation) the ``staged=False`` variant reads the same values from global memory.
* NLC: lanes run along the ``C*M`` output channels (coalesced), each of the 8 warps walks a chunk
  of ``ch`` consecutive outputs; for a specialized width with stride 1 and dilation 1 the
  ``K``-tap window (and its seq_idx values) is carried in registers, one new load per output,
  ``U`` = 4 outputs per group with the group's loads issued before its stores; otherwise every
  tap is a load (L1-cached: the warp's neighbours read the same lines).

Backward (one pass over ``x`` and ``gy``): block ``(n, c, output tile)`` in NCL (the staged
variant stages the weights of ``c``'s ``M`` channels, the input span and the ``M`` grad_output
spans) or ``(n, 32 input channels, 8 chunks)`` in NLC (lanes along ``c``). Each padded position
``q`` of the tile is owned by one thread, which sums its gradient over ``m`` and ``k`` and writes
grad_input (``q >= pl``) or grad_initial_state (``q < pl``) directly. The weight and bias
gradients are two-stage and deterministic: each block reduces its outputs' products in rounds of
``R`` = 9 slots (the taps, then the bias) through a fixed-order tree in shared memory into
``part_w[split, o*K + k]`` and ``part_b[split, o]`` (``split`` = the block's (n, L tile)); stage 2
is ``_numba_gemm.reduce_kernel``.

Update: one thread per ``(n, c)``: the window ``concat(state, x)`` is read from global memory, the
``M`` outputs of every step written, then the new state written in ascending order (each element
reads a later one), so ``state_out`` may be ``state``.

Widths ``K`` = 2..8 are compile-time constants (loops unrolled, weights and windows in registers);
any other width runs the generic path. 16-bit inputs accumulate in float32 and round once.
"""

from __future__ import annotations

import functools

from numba import cuda

from ._numba_common import I64, THREADS, acc_dtype, activation, arr, cdiv, fits, itemsize, \
    make_kernel, nb_type

WARPS = THREADS // 32
MAX_TILE = 4 * THREADS  # NCL outputs per block (4 per thread)
MIN_TILE = 32
MAX_CHUNK = 64  # NLC outputs per warp
MIN_CHUNK = 4
TARGET_BLOCKS = 2048  # enough blocks to fill every SM several times
R = 9  # gradient slots reduced per round (taps, then the bias)
U = 4  # NLC register window: outputs per group (their loads issued together)
SPECIALIZED = range(2, 9)


def kernel_key(k: int) -> int:
    """Compile-time width of the fast paths (2..8); 0 = generic path."""
    return k if k in SPECIALIZED else 0


# ----------------------------------------------------------------------------- launch plans


def _span(p, tl):
    return (tl - 1) * p.s + p.W + 1


def forward_smem(p, tl):
    """Dynamic shared-memory bytes of the staged NCL forward tile of ``tl`` outputs."""
    return _span(p, tl) * itemsize(acc_dtype(p.dtype))


def backward_smem(p, tl, need_weight):
    """Dynamic shared-memory bytes of the staged NCL backward tile: weights, input span (when the
    weight gradient is asked for), the ``M`` grad_output spans and the reduction rounds."""
    gs = tl + p.W // p.s + 2
    n = p.M * p.K + (_span(p, tl) if need_weight else 0) + p.M * gs + R * THREADS
    return n * itemsize(acc_dtype(p.dtype))


def reduce_smem(p):
    """Shared memory of the direct NCL and the NLC backward: the reduction rounds only."""
    return R * THREADS * itemsize(acc_dtype(p.dtype))


def ncl_plan(p, smem_fn):
    """``(tl, staged, smem bytes, blocks)`` of an NCL launch: the largest tile that still gives
    ``TARGET_BLOCKS`` blocks, halved until its footprint fits the shared-memory budget."""
    tl = MAX_TILE
    while tl > THREADS and p.N * p.C * cdiv(p.OL, tl) < TARGET_BLOCKS:
        tl //= 2
    while tl > MIN_TILE and not fits(smem_fn(tl)):
        tl //= 2
    staged = fits(smem_fn(tl))
    if not staged:
        tl = MAX_TILE
    return tl, staged, p.N * p.C * cdiv(p.OL, tl)


def nlc_plan(p, channels):
    """``(ch, blocks, l_tiles)`` of an NLC launch over ``channels`` lanes: the longest chunk per
    warp that still gives ``TARGET_BLOCKS`` blocks."""
    ch = MAX_CHUNK
    tiles_c = cdiv(channels, 32)
    while ch > MIN_CHUNK and p.N * tiles_c * cdiv(p.OL, WARPS * ch) < TARGET_BLOCKS:
        ch //= 2
    tiles_l = cdiv(p.OL, WARPS * ch)
    return ch, p.N * tiles_c * tiles_l, tiles_l


# ----------------------------------------------------------------------------- shared pieces


def _padded_loader(layout, acc, has_state):
    """Device function ``xp(x, state, n, c, q, C, L, W, pl)``: padded input at position ``q``."""
    ZERO = acc(0)
    NCL, HAS_STATE = layout == "NCL", has_state

    def xp(x, state, n, c, q, C, L, W, pl):
        src = q - pl
        v = ZERO
        if src >= 0:
            if src < L:
                if NCL:
                    v = acc(x[(n * C + c) * L + src])
                else:
                    v = acc(x[(n * L + src) * C + c])
        elif HAS_STATE:  # causal: pl == W, so state column q
            v = acc(state[(n * C + c) * W + q])
        return v

    return cuda.jit(device=True, inline=True)(xp)


def _seq_match(has_seq):
    """Device function ``match(seq, base, src, v)``: whether source position ``src`` (``< 0``:
    the state, counted as position 0) belongs to sequence ``v``; always true without seq_idx."""
    HAS_SEQ = has_seq

    def match(seq, base, src, v):
        return not HAS_SEQ or seq[base + max(src, 0)] == v

    return cuda.jit(device=True, inline=True)(match)


def _seq_arr(seq_dt):
    return arr(seq_dt or "int32")


# ----------------------------------------------------------------------------- forward


@functools.lru_cache(maxsize=None)
def forward_kernel(layout, K, dt, act, has_bias, has_state, seq_dt, staged):
    """Depthwise 1-d forward; ``K = 0`` is the generic width. ``seq_dt`` is None (no seq_idx),
    "int32" or "int64". Launch: 1-d grid from :func:`ncl_plan` / :func:`nlc_plan`, ``THREADS``
    threads, :func:`forward_smem` bytes of dynamic shared memory for the staged NCL variant.

    Arguments: x (N, C, L) / (N, L, C), w (C*M, 1, K), b (C*M,) or a dummy, state (N, C, W) or a
    dummy, seq (N, L) or a dummy, y (N, C*M, OL) / (N, OL, C*M): every element written; then
    N, C, L, M, OL, s, d, pl, k (the width, used when K = 0), tile (NCL: outputs per block; NLC:
    outputs per warp).
    """
    ACC = nb_type(acc_dtype(dt))
    ZERO = ACC(0)
    ACT = activation(act, acc_dtype(dt))
    XP = _padded_loader(layout, ACC, has_state)
    MATCH = _seq_match(seq_dt is not None)
    HAS_BIAS, HAS_SEQ, STAGED = has_bias, seq_dt is not None, staged
    KR = K if K else 1
    KU = KR - 1 + U  # register window of a group

    if layout == "NCL":
        def kernel(x, w, b, state, seq, y, N, C, L, M, OL, s, d, pl, kr, tl):
            K_ = kr if K == 0 else K
            W = d * (K_ - 1)
            CO = C * M
            tid = cuda.threadIdx.x
            tiles = (OL + tl - 1) // tl
            bid = I64(cuda.blockIdx.x)
            t = bid % tiles
            nc = bid // tiles
            c = nc % C
            n = nc // C
            l0 = t * tl
            l1 = min(OL, l0 + tl)
            q0 = l0 * s
            sm = cuda.shared.array(0, ACC)
            if STAGED:
                for e in range(tid, (l1 - l0 - 1) * s + W + 1, THREADS):
                    sm[e] = XP(x, state, n, c, q0 + e, C, L, W, pl)
                cuda.syncthreads()
            wr = cuda.local.array(KR, ACC)
            sbase = n * L
            for m in range(M):
                co = c * M + m
                if K != 0:
                    for k in range(K):
                        wr[k] = ACC(w[co * K + k])
                bias = ACC(b[co]) if HAS_BIAS else ZERO
                for l in range(l0 + tid, l1, THREADS):
                    sl = seq[sbase + l] if HAS_SEQ else 0
                    acc = ZERO
                    for k in range(K_):
                        if MATCH(seq, sbase, l - (K_ - 1 - k) * d, sl):
                            wv = wr[k] if K != 0 else ACC(w[co * K_ + k])
                            if STAGED:
                                xv = sm[(l - l0) * s + k * d]
                            else:
                                xv = XP(x, state, n, c, l * s + k * d, C, L, W, pl)
                            acc += wv * xv
                    y[(n * CO + co) * OL + l] = ACT(acc + bias)
    else:
        SEQ_T = nb_type(seq_dt or "int32")

        def kernel(x, w, b, state, seq, y, N, C, L, M, OL, s, d, pl, kr, ch):
            K_ = kr if K == 0 else K
            W = d * (K_ - 1)
            CO = C * M
            tid = cuda.threadIdx.x
            lane = tid % 32
            g = tid // 32
            tiles_c = (CO + 31) // 32
            tiles_l = (OL + WARPS * ch - 1) // (WARPS * ch)
            bid = I64(cuda.blockIdx.x)
            tc = bid % tiles_c
            bid //= tiles_c
            tl_ = bid % tiles_l
            n = bid // tiles_l
            co = tc * 32 + lane
            l0 = (tl_ * WARPS + g) * ch
            l1 = min(OL, l0 + ch)
            if co < CO and l0 < l1:
                c = co // M
                sbase = n * L
                bias = ACC(b[co]) if HAS_BIAS else ZERO
                wr = cuda.local.array(KR, ACC)
                if K != 0:
                    for k in range(K):
                        wr[k] = ACC(w[co * K + k])
                if K != 0 and s == 1 and d == 1:
                    # window: win[j] = xp[l + j], sq[j] = seq of its source position; the U new
                    # loads of a group are issued before its stores (U loads in flight)
                    win = cuda.local.array(KU, ACC)
                    sq = cuda.local.array(KU, SEQ_T)
                    for k in range(K - 1):
                        win[k] = XP(x, state, n, c, l0 + k, C, L, W, pl)
                        if HAS_SEQ:
                            sq[k] = seq[sbase + max(l0 + k - pl, 0)]
                    for l in range(l0, l1, U):
                        nu = min(U, l1 - l)
                        for u in range(U):
                            if u < nu:
                                win[K - 1 + u] = XP(x, state, n, c, l + K - 1 + u, C, L, W, pl)
                                if HAS_SEQ:  # causal: the source of the last tap is l + u
                                    sq[K - 1 + u] = seq[sbase + l + u]
                        for u in range(U):
                            if u < nu:
                                acc = ZERO
                                for k in range(K):
                                    if not HAS_SEQ or sq[u + k] == sq[u + K - 1]:
                                        acc += wr[k] * win[u + k]
                                y[(n * OL + l + u) * CO + co] = ACT(acc + bias)
                        for k in range(K - 1):  # a short last group ends the chunk
                            win[k] = win[k + U]
                            if HAS_SEQ:
                                sq[k] = sq[k + U]
                else:
                    for l in range(l0, l1):
                        sl = seq[sbase + l] if HAS_SEQ else 0
                        acc = ZERO
                        for k in range(K_):
                            if MATCH(seq, sbase, l - (K_ - 1 - k) * d, sl):
                                wv = wr[k] if K != 0 else ACC(w[co * K_ + k])
                                acc += wv * XP(x, state, n, c, l * s + k * d, C, L, W, pl)
                        y[(n * OL + l) * CO + co] = ACT(acc + bias)

    sig = (arr(dt),) * 4 + (_seq_arr(seq_dt), arr(dt)) + (I64,) * 10
    name = (f"conv1d_forward_{layout}_k{K}_{dt}_{act}_bias{int(has_bias)}_state{int(has_state)}"
            f"_seq{seq_dt or 0}_{'staged' if staged else 'direct'}")
    return make_kernel(kernel, sig, name)


@functools.lru_cache(maxsize=None)
def final_state_kernel(layout, dt, has_state):
    """``final[n, c, j]`` = the last W columns of concat(initial_state or zeros, x): one thread per
    element, grid-stride. Arguments: x, state (or a dummy), final (N, C, W), N, C, L, W."""
    ACC = nb_type(acc_dtype(dt))
    ZERO = ACC(0)
    NCL, HAS_STATE = layout == "NCL", has_state

    def kernel(x, state, final, N, C, L, W):
        i = I64(cuda.grid(1))
        stride = I64(cuda.gridsize(1))
        while i < N * C * W:
            j = i % W
            nc = i // W
            src = L - W + j
            v = ZERO
            if src >= 0:
                if NCL:
                    v = ACC(x[nc * L + src])
                else:
                    v = ACC(x[((nc // C) * L + src) * C + nc % C])
            elif HAS_STATE:
                v = ACC(state[nc * W + W + src])
            final[i] = v
            i += stride

    sig = (arr(dt), arr(dt), arr(dt)) + (I64,) * 4
    return make_kernel(kernel, sig, f"conv1d_final_state_{layout}_{dt}_state{int(has_state)}")


# ----------------------------------------------------------------------------- backward


@functools.lru_cache(maxsize=None)
def backward_kernel(layout, K, dt, has_state, seq_dt, need_x, need_w, need_b, need_s, staged):
    """One pass of the depthwise 1-d backward (see module docstring); ``K = 0`` is generic.

    Arguments: x, gy, w, state (or a dummy), seq (or a dummy), gx (the layout of x), part_w
    (S, C*M*K) and part_b (S, C*M) partials (accumulation dtype), gs (N, C, W): each output a
    dummy when not asked for; then N, C, L, M, OL, s, d, pl, k (the width, used when K = 0),
    tile (NCL: outputs per block; NLC: outputs per warp). Launch: the forward's grid;
    :func:`backward_smem` (staged NCL) or :func:`reduce_smem` bytes of dynamic shared memory.
    """
    ACCD = acc_dtype(dt)
    ACC = nb_type(ACCD)
    ZERO = ACC(0)
    XP = _padded_loader(layout, ACC, has_state)
    MATCH = _seq_match(seq_dt is not None)
    HAS_SEQ, STAGED = seq_dt is not None, staged
    NEED_X, NEED_W, NEED_B, NEED_S = need_x, need_w, need_b, need_s
    NEED_GX = need_x or need_s
    NB_ = 1 if need_b else 0

    if layout == "NCL":
        def kernel(x, gy, w, state, seq, gx, pw, pb, gs, N, C, L, M, OL, s, d, pl, kr, tl):
            K_ = kr if K == 0 else K
            W = d * (K_ - 1)
            CO = C * M
            tid = cuda.threadIdx.x
            tiles = (OL + tl - 1) // tl
            bid = I64(cuda.blockIdx.x)
            t = bid % tiles
            nc = bid // tiles
            c = nc % C
            n = nc // C
            l0 = t * tl
            l1 = min(OL, l0 + tl)
            q0 = l0 * s
            qe = pl + L if t == tiles - 1 else min((l0 + tl) * s, pl + L)
            lg0 = max(0, (q0 - W) // s)  # first grad_output staged
            GS = tl + W // s + 2
            XO = M * K_
            GO = XO + ((tl - 1) * s + W + 1 if NEED_W else 0)
            RO = GO + M * GS if STAGED else 0
            sbase = n * L
            sm = cuda.shared.array(0, ACC)
            if STAGED:
                for e in range(tid, M * K_, THREADS):
                    sm[e] = ACC(w[c * M * K_ + e])
                if NEED_W:
                    for e in range(tid, (l1 - l0 - 1) * s + W + 1, THREADS):
                        sm[XO + e] = XP(x, state, n, c, q0 + e, C, L, W, pl)
                ge = l1 - lg0
                for e in range(tid, M * ge, THREADS):
                    m = e // ge
                    i = e - m * ge
                    sm[GO + m * GS + i] = ACC(gy[(n * CO + c * M + m) * OL + lg0 + i])
                cuda.syncthreads()
            if NEED_GX:
                for q in range(q0 + tid, qe, THREADS):
                    src = q - pl
                    if (src >= 0 and NEED_X) or (src < 0 and NEED_S):
                        ss = seq[sbase + max(src, 0)] if HAS_SEQ else 0
                        acc = ZERO
                        for m in range(M):
                            for k in range(K_):
                                u = q - k * d
                                l = u if s == 1 else u // s
                                if l * s == u and l >= 0 and l < OL:
                                    if MATCH(seq, sbase, l, ss):
                                        if STAGED:
                                            wv = sm[m * K_ + k]
                                            gv = sm[GO + m * GS + l - lg0]
                                        else:
                                            wv = ACC(w[(c * M + m) * K_ + k])
                                            gv = ACC(gy[(n * CO + c * M + m) * OL + l])
                                        acc += wv * gv
                        if src >= 0:
                            gx[nc * L + src] = acc
                        else:
                            gs[nc * W + q] = acc
            if NEED_W or NEED_B:
                nslot = (K_ if NEED_W else 0) + NB_
                split = n * tiles + t
                vals = cuda.local.array(R, ACC)
                for m in range(M):
                    co = c * M + m
                    for k0 in range(0, nslot, R):
                        for r in range(R):
                            vals[r] = ZERO
                        for l in range(l0 + tid, l1, THREADS):
                            if STAGED:
                                gv = sm[GO + m * GS + l - lg0]
                            else:
                                gv = ACC(gy[(n * CO + co) * OL + l])
                            sl = seq[sbase + l] if HAS_SEQ else 0
                            for r in range(R):
                                j = k0 + r
                                if NEED_W and j < K_:
                                    if MATCH(seq, sbase, l - (K_ - 1 - j) * d, sl):
                                        if STAGED:
                                            xv = sm[XO + (l - l0) * s + j * d]
                                        else:
                                            xv = XP(x, state, n, c, l * s + j * d, C, L, W, pl)
                                        vals[r] += gv * xv
                                elif NEED_B and j == nslot - 1:
                                    vals[r] += gv
                        for r in range(R):
                            sm[RO + r * THREADS + tid] = vals[r]
                        h = THREADS // 2
                        while h > 0:
                            cuda.syncthreads()
                            if tid < h:
                                for r in range(R):
                                    sm[RO + r * THREADS + tid] += sm[RO + r * THREADS + tid + h]
                            h //= 2
                        cuda.syncthreads()
                        j = k0 + tid
                        if tid < R:
                            if NEED_W and j < K_:
                                pw[(split * CO + co) * K_ + j] = sm[RO + tid * THREADS]
                            elif NEED_B and j == nslot - 1:
                                pb[split * CO + co] = sm[RO + tid * THREADS]
                        cuda.syncthreads()
    else:
        def kernel(x, gy, w, state, seq, gx, pw, pb, gs, N, C, L, M, OL, s, d, pl, kr, ch):
            K_ = kr if K == 0 else K
            W = d * (K_ - 1)
            CO = C * M
            tid = cuda.threadIdx.x
            lane = tid % 32
            g = tid // 32
            tiles_c = (C + 31) // 32
            tiles_l = (OL + WARPS * ch - 1) // (WARPS * ch)
            bid = I64(cuda.blockIdx.x)
            tc = bid % tiles_c
            bid //= tiles_c
            tl_ = bid % tiles_l
            n = bid // tiles_l
            c = tc * 32 + lane
            l0 = (tl_ * WARPS + g) * ch
            l1 = min(OL, l0 + ch)
            q0 = l0 * s
            qe = min((l0 + ch) * s, pl + L)
            if l0 + ch >= OL:  # the last chunk also owns the positions past the outputs
                qe = pl + L
            sbase = n * L
            live = c < C
            if NEED_GX and live:
                for q in range(q0, qe):
                    src = q - pl
                    if (src >= 0 and NEED_X) or (src < 0 and NEED_S):
                        ss = seq[sbase + max(src, 0)] if HAS_SEQ else 0
                        acc = ZERO
                        for m in range(M):
                            co = c * M + m
                            for k in range(K_):
                                u = q - k * d
                                l = u if s == 1 else u // s
                                if l * s == u and l >= 0 and l < OL:
                                    if MATCH(seq, sbase, l, ss):
                                        acc += ACC(w[co * K_ + k]) * ACC(gy[(n * OL + l) * CO + co])
                        if src >= 0:
                            gx[(n * L + src) * C + c] = acc
                        else:
                            gs[(n * C + c) * W + q] = acc
            if NEED_W or NEED_B:
                nslot = (K_ if NEED_W else 0) + NB_
                split = n * tiles_l + tl_
                sm = cuda.shared.array(0, ACC)
                vals = cuda.local.array(R, ACC)
                for m in range(M):
                    co = c * M + m
                    for k0 in range(0, nslot, R):
                        for r in range(R):
                            vals[r] = ZERO
                        if live:
                            for l in range(l0, l1):
                                gv = ACC(gy[(n * OL + l) * CO + co])
                                sl = seq[sbase + l] if HAS_SEQ else 0
                                for r in range(R):
                                    j = k0 + r
                                    if NEED_W and j < K_:
                                        if MATCH(seq, sbase, l - (K_ - 1 - j) * d, sl):
                                            xv = XP(x, state, n, c, l * s + j * d, C, L, W, pl)
                                            vals[r] += gv * xv
                                    elif NEED_B and j == nslot - 1:
                                        vals[r] += gv
                        cuda.syncthreads()
                        for r in range(R):
                            sm[r * THREADS + tid] = vals[r]
                        cuda.syncthreads()
                        if g == 0 and live:
                            for r in range(R):
                                j = k0 + r
                                v = ZERO
                                for ww in range(WARPS):
                                    v += sm[r * THREADS + ww * 32 + lane]
                                if NEED_W and j < K_:
                                    pw[(split * CO + co) * K_ + j] = v
                                elif NEED_B and j == nslot - 1:
                                    pb[split * CO + co] = v

    sig = (arr(dt),) * 4 + (_seq_arr(seq_dt), arr(dt), arr(ACCD), arr(ACCD), arr(dt)) + (I64,) * 10
    needs = "".join(f for f, on in zip("xwbs", (need_x, need_w, need_b, need_s)) if on)
    name = (f"conv1d_backward_{layout}_k{K}_{dt}_state{int(has_state)}_seq{seq_dt or 0}"
            f"_need_{needs}_{'staged' if staged else 'direct'}")
    return make_kernel(kernel, sig, name)


# ----------------------------------------------------------------------------- update


@functools.lru_cache(maxsize=None)
def update_kernel(K, dt, act, has_bias):
    """Decode step(s): one thread per (n, c), grid-stride; ``K = 0`` is the generic width.

    Arguments: x (N, C, T), state (N, C, K-1), w (C*M, 1, K), b (C*M,) or a dummy, y (N, C*M, T),
    state_out (N, C, K-1; may be ``state``), N, C, M, T, k (the width, used when K = 0).
    """
    ACC = nb_type(acc_dtype(dt))
    ZERO = ACC(0)
    ACT = activation(act, acc_dtype(dt))
    HAS_BIAS = has_bias

    def kernel(x, state, w, b, y, so, N, C, M, T, kr):
        K_ = kr if K == 0 else K
        S1 = K_ - 1
        CO = C * M
        i = I64(cuda.grid(1))
        stride = I64(cuda.gridsize(1))
        while i < N * C:
            c = i % C
            n = i // C
            sb = i * S1
            xb = i * T
            for m in range(M):
                co = c * M + m
                bias = ACC(b[co]) if HAS_BIAS else ZERO
                for t in range(T):
                    acc = ZERO
                    for k in range(K_):
                        j = t + k
                        v = ACC(state[sb + j]) if j < S1 else ACC(x[xb + j - S1])
                        acc += ACC(w[co * K_ + k]) * v
                    y[(n * CO + co) * T + t] = ACT(acc + bias)
            for j in range(S1):  # ascending: element j reads the later element T + j
                u = T + j
                so[sb + j] = state[sb + u] if u < S1 else x[xb + u - S1]
            i += stride

    sig = (arr(dt),) * 6 + (I64,) * 5
    return make_kernel(kernel, sig, f"conv1d_update_k{K}_{dt}_{act}_bias{int(has_bias)}")


# ----------------------------------------------------------------------------- seq_idx order


@functools.lru_cache(maxsize=None)
def decreasing_kernel(seq_dt):
    """``flag[0] = 1`` where ``seq[n, l] < seq[n, l-1]`` for some (n, l); grid-stride."""

    def kernel(seq, flag, N, L):
        i = I64(cuda.grid(1))
        stride = I64(cuda.gridsize(1))
        while i < N * L:
            if i % L != 0 and seq[i] < seq[i - 1]:
                flag[0] = 1
            i += stride

    return make_kernel(kernel, (arr(seq_dt), arr("int32"), I64, I64),
                       f"conv1d_seq_decreasing_{seq_dt}")
