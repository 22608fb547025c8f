"""Numba CUDA depthwise kernels: forward, grad_input, grad_weight (stage 1 of 2).

Math (``M`` = channel multiplier, ``o`` an output channel, ``c = o // M`` its input channel, ``xp``
the zero-padded input, taps ``(a, b)`` in ``KH x KW``)::

    forward      y[n, o, i, j]  = act(bias[o]
                                      + sum_{a,b} w[o, a, b] * xp[n, c, i*sh + a*dh, j*sw + b*dw])
    grad_input   gx[n, c, p, q] = sum_{m < M} sum_{a,b} w[c*M + m, a, b] * gy[n, c*M + m, i, j]
                     over the (i, j) in range with i*sh + a*dh = p + pt and j*sw + b*dw = q + pl,
                 i.e. i = (p + pt - a*dh) / sh when that division is exact (likewise j)
    grad_weight  gw[o, a, b]    = sum_{n, i, j} gy[n, o, i, j] * xp[n, c, i*sh + a*dh, j*sw + b*dw]

Tiling. Every kernel runs 256 threads per block on a tile of outputs and first stages, in dynamic
shared memory, the inputs that tile reads (the input tile plus its halo, and the weights), each
loaded once with coalesced reads; every thread then computes several outputs from shared memory.

* NCHW: a block owns one (n, channel) plane tile of ``TILE_H x TILE_W`` = 16 x 32 outputs; lanes
  run along W (coalesced), each thread computes ``ROWS`` = 2 rows.
* NHWC: a block owns ``TILE_C`` = 32 channels x ``PIX_H x PIX_W`` = 4 x 8 pixels; lanes run along C
  (coalesced), each of the 8 warps computes one pixel column of 4 rows.

When the staged footprint (halo grows with kernel size, stride and dilation) exceeds the
shared-memory budget, the same factory builds the ``staged=False`` variant, which reads the same
values straight from global memory (L1/L2 cached).

grad_weight is a two-stage reduction without atomics: stage 1 (here) has each block reduce one
slice of the (n, i, j) domain for its channels into ``partial[split, o*KH*KW + tap]``; stage 2
(``_numba_gemm.reduce_kernel``) sums the splits. Within a block, warp ``w`` owns taps ``w, w+8,
...``: NCHW lanes run along W, so each warp's per-lane sums meet in shared memory at the end;
NHWC lanes run along channels, so every (tap, channel) sum has exactly one owner thread.
"""

from __future__ import annotations

import functools

from numba import cuda

from ._numba_common import (I64, THREADS, acc_dtype, activation, arr, cdiv,
                            itemsize, make_kernel, nb_type)

# NCHW tiles: 32 lanes along W x 8 warps along H, ROWS output rows per thread.
TILE_W = 32
WARPS = THREADS // 32
ROWS = 2
TILE_H = WARPS * ROWS
# NHWC tiles: 32 lanes along C, each warp one pixel column of PIX_H rows.
TILE_C = 32
PIX_W = WARPS
PIX_H = 4
MAX_TAPS_PER_WARP = cdiv(31 * 31, WARPS)  # generic grad_weight: taps owned by one warp


# ----------------------------------------------------------------------------- footprints


def halo(tile, k, stride, dilation):
    """Input extent read by ``tile`` consecutive outputs of a ``k``-tap kernel."""
    return (tile - 1) * stride + (k - 1) * dilation + 1


def grad_halo(tile, k, stride, dilation):
    """grad_output extent read by ``tile`` consecutive grad_input positions (see module math)."""
    return (tile - 1 + (k - 1) * dilation) // stride + 2


def forward_smem(p, layout=None):
    """Dynamic shared-memory bytes of the staged forward / grad_weight tile (weights + halo)."""
    acc = itemsize(acc_dtype(p.dtype))
    kk = p.KH * p.KW
    if (layout or p.layout) == "NCHW":
        n = kk + halo(TILE_H, p.KH, p.sh, p.dh) * halo(TILE_W, p.KW, p.sw, p.dw)
    else:
        n = (kk + halo(PIX_H, p.KH, p.sh, p.dh) * halo(PIX_W, p.KW, p.sw, p.dw)) * TILE_C
    return n * acc


def grad_input_smem(p):
    acc = itemsize(acc_dtype(p.dtype))
    kk = p.KH * p.KW
    if p.layout == "NCHW":
        n = kk + grad_halo(TILE_H, p.KH, p.sh, p.dh) * grad_halo(TILE_W, p.KW, p.sw, p.dw)
    else:
        n = (kk + grad_halo(PIX_H, p.KH, p.sh, p.dh) * grad_halo(PIX_W, p.KW, p.sw, p.dw)) * TILE_C
    return n * acc


def grad_weight_smem(p):
    acc = itemsize(acc_dtype(p.dtype))
    if p.layout == "NCHW":
        n = TILE_H * TILE_W + halo(TILE_H, p.KH, p.sh, p.dh) * halo(TILE_W, p.KW, p.sw, p.dw) \
            + THREADS
    else:
        n = (PIX_H * PIX_W + halo(PIX_H, p.KH, p.sh, p.dh) * halo(PIX_W, p.KW, p.sw, p.dw)) * TILE_C
    return n * acc


# ----------------------------------------------------------------------------- forward


@functools.lru_cache(maxsize=None)
def forward_kernel(layout, KH, KW, in_dt, out_dt, act, has_bias, staged):
    """Depthwise forward. ``KH = KW = 0`` is the generic path (kernel size from arguments).

    ``out_dt`` may differ from ``in_dt`` (the unfused separable path keeps its intermediate in the
    accumulation dtype). Launch: 1-d grid over tiles, ``THREADS`` threads, dynamic shared memory
    :func:`forward_smem` bytes when ``staged``.
    """
    ACC = nb_type(acc_dtype(in_dt))
    ZERO = ACC(0)
    ACT = activation(act, acc_dtype(in_dt))
    HAS_BIAS, STAGED = has_bias, staged

    if layout == "NCHW":
        def kernel(x,   # (N, C, H, W) flattened, in_dt
                   w,   # (CO, KH, KW) flattened, in_dt
                   b,   # (CO,) bias (ignored unless HAS_BIAS)
                   y,   # (N, CO, OH, OW) flattened, out_dt: every element written
                   N, C, H, W, M, OH, OW,  # logical sizes
                   sh, sw, dh, dw, pt, pl,  # stride, dilation, top/left padding
                   kh, kw):  # kernel size (used when KH == 0: generic path)
            KH_ = kh if KH == 0 else KH
            KW_ = kw if KW == 0 else KW
            KK = KH_ * KW_
            CO = C * M
            tid = cuda.threadIdx.x
            tx = tid % 32
            ty = tid // 32
            tiles_w = (OW + TILE_W - 1) // TILE_W
            tiles_h = (OH + TILE_H - 1) // TILE_H
            bid = I64(cuda.blockIdx.x)
            tw = bid % tiles_w
            bid //= tiles_w
            th = bid % tiles_h
            nco = bid // tiles_h
            co = nco % CO
            n = nco // CO
            c = co // M
            oh0 = th * TILE_H
            ow0 = tw * TILE_W
            ih0 = oh0 * sh - pt
            iw0 = ow0 * sw - pl
            xbase = (n * C + c) * H * W
            IH_S = (TILE_H - 1) * sh + (KH_ - 1) * dh + 1
            IW_S = (TILE_W - 1) * sw + (KW_ - 1) * dw + 1
            sm = cuda.shared.array(0, ACC)
            if STAGED:
                for t in range(tid, KK, THREADS):
                    sm[t] = ACC(w[co * KK + t])
                for e in range(tid, IH_S * IW_S, THREADS):
                    r = e // IW_S
                    q = e - r * IW_S
                    h = ih0 + r
                    ww = iw0 + q
                    v = ZERO
                    if h >= 0 and h < H and ww >= 0 and ww < W:
                        v = ACC(x[xbase + h * W + ww])
                    sm[KK + e] = v
                cuda.syncthreads()
            ow = ow0 + tx
            for rr in range(ROWS):
                lr = ty + rr * WARPS  # local output row
                oh = oh0 + lr
                acc = ZERO
                for a in range(KH_):
                    for bb in range(KW_):
                        if STAGED:
                            wv = sm[a * KW_ + bb]
                            xv = sm[KK + (lr * sh + a * dh) * IW_S + tx * sw + bb * dw]
                        else:
                            wv = ACC(w[co * KK + a * KW_ + bb])
                            h = oh * sh - pt + a * dh
                            ww = ow * sw - pl + bb * dw
                            xv = ZERO
                            if h >= 0 and h < H and ww >= 0 and ww < W:
                                xv = ACC(x[xbase + h * W + ww])
                        acc += wv * xv
                if oh < OH and ow < OW:
                    if HAS_BIAS:
                        acc += ACC(b[co])
                    y[(nco * OH + oh) * OW + ow] = ACT(acc)
    else:
        def kernel(x,   # (N, H, W, C) flattened, in_dt
                   w,   # (CO, KH, KW) flattened, in_dt
                   b,   # (CO,) bias (ignored unless HAS_BIAS)
                   y,   # (N, OH, OW, CO) flattened, out_dt: every element written
                   N, C, H, W, M, OH, OW,  # logical sizes
                   sh, sw, dh, dw, pt, pl,  # stride, dilation, top/left padding
                   kh, kw):  # kernel size (used when KH == 0: generic path)
            KH_ = kh if KH == 0 else KH
            KW_ = kw if KW == 0 else KW
            KK = KH_ * KW_
            CO = C * M
            tid = cuda.threadIdx.x
            lane = tid % 32
            g = tid // 32  # this warp's pixel column
            tiles_c = (CO + TILE_C - 1) // TILE_C
            tiles_w = (OW + PIX_W - 1) // PIX_W
            tiles_h = (OH + PIX_H - 1) // PIX_H
            bid = I64(cuda.blockIdx.x)
            tc = bid % tiles_c
            bid //= tiles_c
            tw = bid % tiles_w
            bid //= tiles_w
            th = bid % tiles_h
            n = bid // tiles_h
            co0 = tc * TILE_C
            ci0 = co0 // M  # first input channel of the tile
            co = co0 + lane
            cl = co // M - ci0  # this lane's input channel, local to the tile
            oh0 = th * PIX_H
            ow0 = tw * PIX_W
            ih0 = oh0 * sh - pt
            iw0 = ow0 * sw - pl
            IH_S = (PIX_H - 1) * sh + (KH_ - 1) * dh + 1
            IW_S = (PIX_W - 1) * sw + (KW_ - 1) * dw + 1
            XS = KK * TILE_C  # offset of the input tile in shared memory
            sm = cuda.shared.array(0, ACC)
            if STAGED:
                for e in range(tid, KK * TILE_C, THREADS):
                    t = e // TILE_C
                    o = co0 + e - t * TILE_C
                    sm[e] = ACC(w[o * KK + t]) if o < CO else ZERO
                for e in range(tid, IH_S * IW_S * TILE_C, THREADS):
                    pix = e // TILE_C
                    ci = ci0 + e - pix * TILE_C
                    r = pix // IW_S
                    h = ih0 + r
                    ww = iw0 + pix - r * IW_S
                    v = ZERO
                    if h >= 0 and h < H and ww >= 0 and ww < W and ci < C:
                        v = ACC(x[((n * H + h) * W + ww) * C + ci])
                    sm[XS + e] = v
                cuda.syncthreads()
            if co < CO:
                ow = ow0 + g
                for ph in range(PIX_H):
                    oh = oh0 + ph
                    acc = ZERO
                    for a in range(KH_):
                        for bb in range(KW_):
                            if STAGED:
                                wv = sm[(a * KW_ + bb) * TILE_C + lane]
                                xv = sm[XS + ((ph * sh + a * dh) * IW_S + g * sw + bb * dw) * TILE_C
                                        + cl]
                            else:
                                wv = ACC(w[co * KK + a * KW_ + bb])
                                h = oh * sh - pt + a * dh
                                ww = ow * sw - pl + bb * dw
                                xv = ZERO
                                if h >= 0 and h < H and ww >= 0 and ww < W:
                                    xv = ACC(x[((n * H + h) * W + ww) * C + ci0 + cl])
                            acc += wv * xv
                    if oh < OH and ow < OW:
                        if HAS_BIAS:
                            acc += ACC(b[co])
                        y[((n * OH + oh) * OW + ow) * CO + co] = ACT(acc)

    sig = (arr(in_dt), arr(in_dt), arr(in_dt), arr(out_dt)) + (I64,) * 15
    name = f"depthwise_forward_{layout}_k{KH}x{KW}_{in_dt}_to_{out_dt}_{act}_bias{int(has_bias)}" \
           f"_{'staged' if staged else 'direct'}"
    return make_kernel(kernel, sig, name)


def forward_grid(p, layout=None):
    if (layout or p.layout) == "NCHW":
        return p.N * p.CO * cdiv(p.OH, TILE_H) * cdiv(p.OW, TILE_W)
    return p.N * cdiv(p.OH, PIX_H) * cdiv(p.OW, PIX_W) * cdiv(p.CO, TILE_C)


# ----------------------------------------------------------------------------- grad_input


@functools.lru_cache(maxsize=None)
def grad_input_kernel(layout, KH, KW, dt, staged):
    """Depthwise grad_input (see module math); 1-d grid over grad_input tiles."""
    ACC = nb_type(acc_dtype(dt))
    ZERO = ACC(0)
    STAGED = staged

    if layout == "NCHW":
        def kernel(gy,  # (N, CO, OH, OW) flattened
                   w,   # (CO, KH, KW) flattened
                   gx,  # (N, C, H, W) flattened: every element written
                   N, C, H, W, M, OH, OW,  # logical sizes
                   sh, sw, dh, dw, pt, pl,  # stride, dilation, top/left padding
                   kh, kw):  # kernel size (generic path)
            KH_ = kh if KH == 0 else KH
            KW_ = kw if KW == 0 else KW
            KK = KH_ * KW_
            CO = C * M
            tid = cuda.threadIdx.x
            tx = tid % 32
            ty = tid // 32
            tiles_w = (W + TILE_W - 1) // TILE_W
            tiles_h = (H + TILE_H - 1) // TILE_H
            bid = I64(cuda.blockIdx.x)
            tw = bid % tiles_w
            bid //= tiles_w
            th = bid % tiles_h
            nc = bid // tiles_h
            c = nc % C
            n = nc // C
            h0 = th * TILE_H
            w0 = tw * TILE_W
            # first grad_output row/col any position of the tile reads (floor division)
            i0 = (h0 + pt - (KH_ - 1) * dh) // sh
            j0 = (w0 + pl - (KW_ - 1) * dw) // sw
            GH = (TILE_H - 1 + (KH_ - 1) * dh) // sh + 2
            GW = (TILE_W - 1 + (KW_ - 1) * dw) // sw + 2
            sm = cuda.shared.array(0, ACC)
            acc = cuda.local.array(ROWS, ACC)
            for rr in range(ROWS):
                acc[rr] = ZERO
            q = w0 + tx
            for m in range(M):
                co = c * M + m
                gbase = (n * CO + co) * OH * OW
                if STAGED:
                    cuda.syncthreads()  # previous m done with the tile
                    for t in range(tid, KK, THREADS):
                        sm[t] = ACC(w[co * KK + t])
                    for e in range(tid, GH * GW, THREADS):
                        r = e // GW
                        i = i0 + r
                        j = j0 + e - r * GW
                        v = ZERO
                        if i >= 0 and i < OH and j >= 0 and j < OW:
                            v = ACC(gy[gbase + i * OW + j])
                        sm[KK + e] = v
                    cuda.syncthreads()
                for rr in range(ROWS):
                    p = h0 + ty + rr * WARPS
                    s = ZERO
                    for a in range(KH_):
                        t = p + pt - a * dh
                        i = t // sh
                        if i * sh == t and i >= 0 and i < OH:
                            for bb in range(KW_):
                                u = q + pl - bb * dw
                                j = u // sw
                                if j * sw == u and j >= 0 and j < OW:
                                    if STAGED:
                                        wv = sm[a * KW_ + bb]
                                        gv = sm[KK + (i - i0) * GW + j - j0]
                                    else:
                                        wv = ACC(w[co * KK + a * KW_ + bb])
                                        gv = ACC(gy[gbase + i * OW + j])
                                    s += wv * gv
                    acc[rr] += s
            for rr in range(ROWS):
                p = h0 + ty + rr * WARPS
                if p < H and q < W:
                    gx[(nc * H + p) * W + q] = acc[rr]
    else:
        def kernel(gy,  # (N, OH, OW, CO) flattened
                   w,   # (CO, KH, KW) flattened
                   gx,  # (N, H, W, C) flattened: every element written
                   N, C, H, W, M, OH, OW,  # logical sizes
                   sh, sw, dh, dw, pt, pl,  # stride, dilation, top/left padding
                   kh, kw):  # kernel size (generic path)
            KH_ = kh if KH == 0 else KH
            KW_ = kw if KW == 0 else KW
            KK = KH_ * KW_
            CO = C * M
            tid = cuda.threadIdx.x
            lane = tid % 32
            g = tid // 32
            tiles_c = (C + TILE_C - 1) // TILE_C
            tiles_w = (W + PIX_W - 1) // PIX_W
            tiles_h = (H + PIX_H - 1) // PIX_H
            bid = I64(cuda.blockIdx.x)
            tc = bid % tiles_c
            bid //= tiles_c
            tw = bid % tiles_w
            bid //= tiles_w
            th = bid % tiles_h
            n = bid // tiles_h
            c0 = tc * TILE_C
            c = c0 + lane
            h0 = th * PIX_H
            w0 = tw * PIX_W
            i0 = (h0 + pt - (KH_ - 1) * dh) // sh
            j0 = (w0 + pl - (KW_ - 1) * dw) // sw
            GH = (PIX_H - 1 + (KH_ - 1) * dh) // sh + 2
            GW = (PIX_W - 1 + (KW_ - 1) * dw) // sw + 2
            GS = KK * TILE_C
            sm = cuda.shared.array(0, ACC)
            acc = cuda.local.array(PIX_H, ACC)
            for ph in range(PIX_H):
                acc[ph] = ZERO
            q = w0 + g
            for m in range(M):
                if STAGED:
                    cuda.syncthreads()
                    for e in range(tid, KK * TILE_C, THREADS):
                        t = e // TILE_C
                        cc = c0 + e - t * TILE_C
                        sm[e] = ACC(w[(cc * M + m) * KK + t]) if cc < C else ZERO
                    for e in range(tid, GH * GW * TILE_C, THREADS):
                        pix = e // TILE_C
                        cc = c0 + e - pix * TILE_C
                        r = pix // GW
                        i = i0 + r
                        j = j0 + pix - r * GW
                        v = ZERO
                        if i >= 0 and i < OH and j >= 0 and j < OW and cc < C:
                            v = ACC(gy[((n * OH + i) * OW + j) * CO + cc * M + m])
                        sm[GS + e] = v
                    cuda.syncthreads()
                if c < C:
                    co = c * M + m
                    for ph in range(PIX_H):
                        p = h0 + ph
                        s = ZERO
                        for a in range(KH_):
                            t = p + pt - a * dh
                            i = t // sh
                            if i * sh == t and i >= 0 and i < OH:
                                for bb in range(KW_):
                                    u = q + pl - bb * dw
                                    j = u // sw
                                    if j * sw == u and j >= 0 and j < OW:
                                        if STAGED:
                                            wv = sm[(a * KW_ + bb) * TILE_C + lane]
                                            gv = sm[GS + ((i - i0) * GW + j - j0) * TILE_C + lane]
                                        else:
                                            wv = ACC(w[co * KK + a * KW_ + bb])
                                            gv = ACC(gy[((n * OH + i) * OW + j) * CO + co])
                                        s += wv * gv
                        acc[ph] += s
            if c < C and q < W:
                for ph in range(PIX_H):
                    p = h0 + ph
                    if p < H:
                        gx[((n * H + p) * W + q) * C + c] = acc[ph]

    sig = (arr(dt), arr(dt), arr(dt)) + (I64,) * 15
    name = f"depthwise_grad_input_{layout}_k{KH}x{KW}_{dt}_{'staged' if staged else 'direct'}"
    return make_kernel(kernel, sig, name)


def grad_input_grid(p):
    if p.layout == "NCHW":
        return p.N * p.C * cdiv(p.H, TILE_H) * cdiv(p.W, TILE_W)
    return p.N * cdiv(p.H, PIX_H) * cdiv(p.W, PIX_W) * cdiv(p.C, TILE_C)


# ----------------------------------------------------------------------------- grad_weight


@functools.lru_cache(maxsize=None)
def grad_weight_kernel(layout, KH, KW, dt, staged):
    """Stage 1 of the depthwise weight gradient: ``partial[split, o*KH*KW + tap]`` (acc dtype).

    Block ``(channel tile, split)`` reduces tiles ``[split*per, min(T, (split+1)*per))`` of the
    (n, output-row-tile, output-col-tile) domain, ``T`` tiles in all.
    """
    ACCD = acc_dtype(dt)
    ACC = nb_type(ACCD)
    ZERO = ACC(0)
    STAGED = staged
    OWN = cdiv(KH * KW, WARPS) if KH else MAX_TAPS_PER_WARP  # taps per warp (registers)

    if layout == "NCHW":
        def kernel(x,   # (N, C, H, W) flattened
                   gy,  # (N, CO, OH, OW) flattened
                   part,  # (splits, CO*KH*KW) flattened, acc dtype: every element written
                   N, C, H, W, M, OH, OW,  # logical sizes
                   sh, sw, dh, dw, pt, pl,  # stride, dilation, top/left padding
                   kh, kw,  # kernel size (generic path)
                   splits, per):  # number of splits, tiles per split
            KH_ = kh if KH == 0 else KH
            KW_ = kw if KW == 0 else KW
            KK = KH_ * KW_
            CO = C * M
            tid = cuda.threadIdx.x
            lane = tid % 32
            wp = tid // 32
            tiles_w = (OW + TILE_W - 1) // TILE_W
            tiles_h = (OH + TILE_H - 1) // TILE_H
            T = N * tiles_h * tiles_w
            bid = I64(cuda.blockIdx.x)
            split = bid % splits
            co = bid // splits
            c = co // M
            IH_S = (TILE_H - 1) * sh + (KH_ - 1) * dh + 1
            IW_S = (TILE_W - 1) * sw + (KW_ - 1) * dw + 1
            XS = TILE_H * TILE_W  # input tile offset (grad_output tile first)
            RS = XS + IH_S * IW_S if STAGED else 0  # reduction scratch offset
            sm = cuda.shared.array(0, ACC)
            own = cuda.local.array(OWN, ACC)
            nown = (KK - wp + WARPS - 1) // WARPS  # taps this warp owns
            for k in range(OWN):
                own[k] = ZERO
            t_end = min(T, (split + 1) * per)
            for ti in range(split * per, t_end):
                tw = ti % tiles_w
                n = ti // tiles_w
                th = n % tiles_h
                n //= tiles_h
                oh0 = th * TILE_H
                ow0 = tw * TILE_W
                ih0 = oh0 * sh - pt
                iw0 = ow0 * sw - pl
                xbase = (n * C + c) * H * W
                gbase = (n * CO + co) * OH * OW
                nr = min(TILE_H, OH - oh0)
                ncol = min(TILE_W, OW - ow0)
                if STAGED:
                    cuda.syncthreads()
                    for e in range(tid, TILE_H * TILE_W, THREADS):
                        r = e // TILE_W
                        q = e - r * TILE_W
                        v = ZERO
                        if r < nr and q < ncol:
                            v = ACC(gy[gbase + (oh0 + r) * OW + ow0 + q])
                        sm[e] = v
                    for e in range(tid, IH_S * IW_S, THREADS):
                        r = e // IW_S
                        h = ih0 + r
                        ww = iw0 + e - r * IW_S
                        v = ZERO
                        if h >= 0 and h < H and ww >= 0 and ww < W:
                            v = ACC(x[xbase + h * W + ww])
                        sm[XS + e] = v
                    cuda.syncthreads()
                if lane < ncol:
                    for k in range(nown):
                        tap = wp + k * WARPS
                        a = tap // KW_
                        bb = tap - a * KW_
                        s = ZERO
                        for r in range(nr):
                            if STAGED:
                                gv = sm[r * TILE_W + lane]
                                xv = sm[XS + (r * sh + a * dh) * IW_S + lane * sw + bb * dw]
                            else:
                                gv = ACC(gy[gbase + (oh0 + r) * OW + ow0 + lane])
                                h = ih0 + r * sh + a * dh
                                ww = iw0 + lane * sw + bb * dw
                                xv = ZERO
                                if h >= 0 and h < H and ww >= 0 and ww < W:
                                    xv = ACC(x[xbase + h * W + ww])
                            s += gv * xv
                        own[k] += s
            # lanes of a warp meet in shared memory, one owned tap per round
            L = CO * KK
            for k in range(OWN):
                if k * WARPS < KK:  # uniform across the block
                    cuda.syncthreads()
                    sm[RS + tid] = own[k]
                    cuda.syncthreads()
                    tap = wp + k * WARPS
                    if lane == 0 and tap < KK:
                        s = ZERO
                        for l in range(32):
                            s += sm[RS + wp * 32 + l]
                        part[split * L + co * KK + tap] = s
    else:
        def kernel(x,   # (N, H, W, C) flattened
                   gy,  # (N, OH, OW, CO) flattened
                   part,  # (splits, CO*KH*KW) flattened, acc dtype: every element written
                   N, C, H, W, M, OH, OW,  # logical sizes
                   sh, sw, dh, dw, pt, pl,  # stride, dilation, top/left padding
                   kh, kw,  # kernel size (generic path)
                   splits, per):  # number of splits, tiles per split
            KH_ = kh if KH == 0 else KH
            KW_ = kw if KW == 0 else KW
            KK = KH_ * KW_
            CO = C * M
            tid = cuda.threadIdx.x
            lane = tid % 32
            wp = tid // 32
            tiles_w = (OW + PIX_W - 1) // PIX_W
            tiles_h = (OH + PIX_H - 1) // PIX_H
            T = N * tiles_h * tiles_w
            bid = I64(cuda.blockIdx.x)
            split = bid % splits
            co0 = (bid // splits) * TILE_C
            ci0 = co0 // M
            co = co0 + lane
            cl = co // M - ci0
            IH_S = (PIX_H - 1) * sh + (KH_ - 1) * dh + 1
            IW_S = (PIX_W - 1) * sw + (KW_ - 1) * dw + 1
            XS = PIX_H * PIX_W * TILE_C
            sm = cuda.shared.array(0, ACC)
            own = cuda.local.array(OWN, ACC)
            nown = (KK - wp + WARPS - 1) // WARPS
            for k in range(OWN):
                own[k] = ZERO
            t_end = min(T, (split + 1) * per)
            for ti in range(split * per, t_end):
                tw = ti % tiles_w
                n = ti // tiles_w
                th = n % tiles_h
                n //= tiles_h
                oh0 = th * PIX_H
                ow0 = tw * PIX_W
                ih0 = oh0 * sh - pt
                iw0 = ow0 * sw - pl
                nr = min(PIX_H, OH - oh0)
                ncol = min(PIX_W, OW - ow0)
                if STAGED:
                    cuda.syncthreads()
                    for e in range(tid, PIX_H * PIX_W * TILE_C, THREADS):
                        pix = e // TILE_C
                        o = co0 + e - pix * TILE_C
                        r = pix // PIX_W
                        q = pix - r * PIX_W
                        v = ZERO
                        if r < nr and q < ncol and o < CO:
                            v = ACC(gy[((n * OH + oh0 + r) * OW + ow0 + q) * CO + o])
                        sm[e] = v
                    for e in range(tid, IH_S * IW_S * TILE_C, THREADS):
                        pix = e // TILE_C
                        ci = ci0 + e - pix * TILE_C
                        r = pix // IW_S
                        h = ih0 + r
                        ww = iw0 + pix - r * IW_S
                        v = ZERO
                        if h >= 0 and h < H and ww >= 0 and ww < W and ci < C:
                            v = ACC(x[((n * H + h) * W + ww) * C + ci])
                        sm[XS + e] = v
                    cuda.syncthreads()
                if co < CO:
                    for k in range(nown):
                        tap = wp + k * WARPS
                        a = tap // KW_
                        bb = tap - a * KW_
                        s = ZERO
                        for r in range(nr):
                            for q in range(ncol):
                                if STAGED:
                                    gv = sm[(r * PIX_W + q) * TILE_C + lane]
                                    xv = sm[XS + ((r * sh + a * dh) * IW_S + q * sw + bb * dw)
                                            * TILE_C + cl]
                                else:
                                    gv = ACC(gy[((n * OH + oh0 + r) * OW + ow0 + q) * CO + co])
                                    h = ih0 + r * sh + a * dh
                                    ww = iw0 + q * sw + bb * dw
                                    xv = ZERO
                                    if h >= 0 and h < H and ww >= 0 and ww < W:
                                        xv = ACC(x[((n * H + h) * W + ww) * C + ci0 + cl])
                                s += gv * xv
                        own[k] += s
            if co < CO:
                L = CO * KK
                for k in range(nown):
                    part[split * L + co * KK + wp + k * WARPS] = own[k]

    sig = (arr(dt), arr(dt), arr(ACCD)) + (I64,) * 17
    name = f"depthwise_grad_weight_{layout}_k{KH}x{KW}_{dt}_{'staged' if staged else 'direct'}"
    return make_kernel(kernel, sig, name)


def grad_weight_plan(p, target_blocks=1024):
    """``(blocks, splits, tiles_per_split)`` of the stage-1 launch: about ``target_blocks``."""
    if p.layout == "NCHW":
        T = p.N * cdiv(p.OH, TILE_H) * cdiv(p.OW, TILE_W)
        groups = p.CO
    else:
        T = p.N * cdiv(p.OH, PIX_H) * cdiv(p.OW, PIX_W)
        groups = cdiv(p.CO, TILE_C)
    splits = max(1, min(T, cdiv(target_blocks, groups)))
    per = cdiv(T, splits)
    splits = cdiv(T, per)
    return groups * splits, splits, per
