"""Numba CUDA pointwise kernels: a tiled GEMM with a fused epilogue, the split reduction, and the
fused depthwise-separable kernel.

GEMM. Every pointwise op is ``C[z][m, n] = sum_k A[m, k] * B[k, n]`` for strided views of the
flattened arrays (the launcher in ``numba_cuda.py`` picks the strides per op and layout)::

    pointwise forward   NCHW: A = W (CO x CI), B = x[n] (CI x HW), one z per image
                        NHWC: A = x (NHW x CI), B = W^T (CI x CO)
    grad_input          gx = W^T gy (NCHW per image; NHWC as gy (NHW x CO) @ W (CO x CI))
    grad_weight         gW = sum_n gy[n] x[n]^T (NCHW) or gy^T x over NHW rows (NHWC)

and the epilogue ``C = act(acc + bias) + residual`` is applied before the single store. A block
computes a ``BM x BN`` = 64 x 64 tile with 256 threads, each owning ``TM x TN`` = 4 x 4 outputs in
registers; the k loop stages ``BK`` = 16 wide slices of A and B in shared memory (padded rows, so
neither the transposed stores nor the reads conflict), loaded coalesced along whichever of the two
operand axes is contiguous. Long reductions (the weight gradient over N*H*W) are split: the
reduction domain is ``nbr`` batches x ``K`` rows; split ``s = g * ks + kc`` covers the batches
``[g*bpg, (g+1)*bpg)`` and the rows ``[kc*kc_len, (kc+1)*kc_len)`` of each; every split writes its
own slice of a partial buffer and :func:`reduce_kernel` sums the slices (no atomics,
deterministic).

Separable (fused). ``y = act(PW @ dw_act(dw(x) + dw_b) + b) + residual``. A block owns a 64-pixel
output tile; for every chunk of ``XC`` = 4 intermediate channels it stages the input halo of their
input channels in shared memory and computes the depthwise outputs into a shared-memory
intermediate tile ``mid[CM][64]`` (CM = C*M channels, accumulation dtype), so the intermediate
never reaches device memory; then it runs the GEMM ``PW (CO x CM) @ mid (CM x 64)`` out of shared
memory over 64-channel slices of CO and applies the epilogue before the one store. It is used when
the whole ``mid`` tile fits the shared-memory budget; beyond that the launcher runs the unfused
path (depthwise into a temporary, then the GEMM).
"""

from __future__ import annotations

import functools

from numba import cuda

from ._numba_common import I64, THREADS, acc_dtype, activation, arr, itemsize, make_kernel, nb_type

BM = 64  # GEMM tile rows (m)
BN = 64  # GEMM tile columns (n)
BK = 16  # reduction slice staged per step
TM = 4  # outputs per thread along m
TN = 4  # outputs per thread along n
PAD = BM + 1  # padded shared row (BM == BN)
TPR = 16  # threads per tile row: 16 x 16 threads


@functools.lru_cache(maxsize=None)
def gemm_kernel(a_dt, b_dt, c_dt, act, has_bias, bias_on_m, has_res):
    """``C[z] = act(A @ B + bias) + R`` over strided views (see module docstring).

    Launch: 1-d grid of ``tiles_m * tiles_n * nz`` blocks, 256 threads, no dynamic shared memory.
    """
    ACC = nb_type(acc_dtype(a_dt if itemsize(a_dt) >= itemsize(b_dt) else b_dt))
    ZERO = ACC(0)
    ACT = activation(act, "float64" if ACC.bitwidth == 64 else "float32")
    HAS_BIAS, BIAS_ON_M, HAS_RES = has_bias, bias_on_m, has_res

    def kernel(A,   # flattened operand A, a_dt
               B,   # flattened operand B, b_dt
               C,   # flattened output (or partial buffer), c_dt
               bias,  # bias vector, c_dt (ignored unless HAS_BIAS), indexed by m or n
               R,   # residual, addressed like C (ignored unless HAS_RES)
               Mr, Nc, K,  # rows of C, columns of C, reduction length per batch
               a_bo, a_br, a_sm, a_sk,  # A strides: output batch, reduced batch, m, k
               b_bo, b_br, b_sk, b_sn,  # B strides: output batch, reduced batch, k, n
               c_bz, c_sm, c_sn,  # C strides: z, m, n
               nbr, bpg, ks, kc_len):  # reduced batches, batches/group, k splits, rows/split
        tid = cuda.threadIdx.x
        tx = tid % TPR
        ty = tid // TPR
        tiles_n = (Nc + BN - 1) // BN
        tiles_m = (Mr + BM - 1) // BM
        bid = I64(cuda.blockIdx.x)
        tn = bid % tiles_n
        bid //= tiles_n
        tm = bid % tiles_m
        z = bid // tiles_m
        ns = ((nbr + bpg - 1) // bpg) * ks  # splits per output batch
        bo = z // ns
        s = z - bo * ns
        grp = s // ks
        k_begin = (s - grp * ks) * kc_len
        k_end = min(K, k_begin + kc_len)
        m0 = tm * BM
        n0 = tn * BN
        sA = cuda.shared.array((BK, PAD), ACC)
        sB = cuda.shared.array((BK, PAD), ACC)
        acc = cuda.local.array((TM, TN), ACC)
        ar = cuda.local.array(TM, ACC)
        br = cuda.local.array(TN, ACC)
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = ZERO
        for rb in range(grp * bpg, min(nbr, grp * bpg + bpg)):
            aoff = bo * a_bo + rb * a_br
            boff = bo * b_bo + rb * b_br
            for k0 in range(k_begin, k_end, BK):
                for l in range(BK * BM // THREADS):
                    e = tid + l * THREADS
                    if a_sk == 1:  # coalesced along k
                        mm = e // BK
                        kk = e - mm * BK
                    else:  # coalesced along m
                        kk = e // BM
                        mm = e - kk * BM
                    gm = m0 + mm
                    gk = k0 + kk
                    v = ZERO
                    if gm < Mr and gk < k_end:
                        v = ACC(A[aoff + gm * a_sm + gk * a_sk])
                    sA[kk, mm] = v
                    if b_sn == 1:  # coalesced along n
                        kk = e // BN
                        nn = e - kk * BN
                    else:  # coalesced along k
                        nn = e // BK
                        kk = e - nn * BK
                    gn = n0 + nn
                    gk = k0 + kk
                    v = ZERO
                    if gn < Nc and gk < k_end:
                        v = ACC(B[boff + gk * b_sk + gn * b_sn])
                    sB[kk, nn] = v
                cuda.syncthreads()
                for kk in range(BK):
                    for i in range(TM):
                        ar[i] = sA[kk, ty + i * TPR]
                    for j in range(TN):
                        br[j] = sB[kk, tx + j * TPR]
                    for i in range(TM):
                        for j in range(TN):
                            acc[i, j] += ar[i] * br[j]
                cuda.syncthreads()
        for i in range(TM):
            m = m0 + ty + i * TPR
            for j in range(TN):
                n = n0 + tx + j * TPR
                if m < Mr and n < Nc:
                    v = acc[i, j]
                    if HAS_BIAS:
                        v += ACC(bias[m] if BIAS_ON_M else bias[n])
                    v = ACT(v)
                    idx = z * c_bz + m * c_sm + n * c_sn
                    if HAS_RES:
                        v += ACC(R[idx])
                    C[idx] = v

    sig = (arr(a_dt), arr(b_dt), arr(c_dt), arr(c_dt), arr(c_dt)) + (I64,) * 18
    name = (f"pointwise_gemm_{a_dt}x{b_dt}_to_{c_dt}_{act}_bias{int(has_bias)}"
            f"{'m' if bias_on_m else 'n'}_res{int(has_res)}")
    return make_kernel(kernel, sig, name)


@functools.lru_cache(maxsize=None)
def reduce_kernel(part_dt, out_dt):
    """Stage 2 of every split reduction: ``out[i] = sum_s part[s*L + i]`` (grid-stride)."""
    ACC = nb_type(part_dt)

    def kernel(part,  # (S, L) flattened partial sums, accumulation dtype
               out,   # (L,) result, out_dt: every element written
               L, S):  # result length, number of partial slices
        i = I64(cuda.grid(1))
        stride = I64(cuda.gridsize(1))
        while i < L:
            v = ACC(0)
            for s in range(S):
                v += part[s * L + i]
            out[i] = v
            i += stride

    sig = (arr(part_dt), arr(out_dt), I64, I64)
    return make_kernel(kernel, sig, f"reduce_splits_{part_dt}_to_{out_dt}")


# ----------------------------------------------------------------------------- separable (fused)

XC = 4  # intermediate channels computed per staging step (THREADS = XC * PIX)
PIX = 64  # output pixels per block
SEP_TILE = {"NCHW": (2, 32), "NHWC": (8, 8)}  # (rows, cols) of the pixel tile


def sep_halo(p):
    """(IH_S, IW_S) input halo of one fused tile."""
    r, q = SEP_TILE[p.layout]
    return ((r - 1) * p.sh + (p.KH - 1) * p.dh + 1, (q - 1) * p.sw + (p.KW - 1) * p.dw + 1)

def separable_smem(sp):
    """Dynamic shared-memory bytes of the fused kernel: A slice + intermediate tile + halo."""
    p = sp.dw
    ih, iw = sep_halo(p)
    return (BK * PAD + p.CO * PIX + XC * ih * iw) * itemsize(acc_dtype(p.dtype))


@functools.lru_cache(maxsize=None)
def separable_kernel(layout, KH, KW, dt, dw_act, act, has_dw_bias, has_bias, has_res):
    """Fused separable forward (see module docstring); 1-d grid over 64-pixel tiles, 256 threads,
    :func:`separable_smem` bytes of dynamic shared memory. ``KH = KW = 0``: generic kernel size."""
    ACCD = acc_dtype(dt)
    ACC = nb_type(ACCD)
    ZERO = ACC(0)
    DW_ACT = activation(dw_act, ACCD)
    ACT = activation(act, ACCD)
    HAS_DW_BIAS, HAS_BIAS, HAS_RES = has_dw_bias, has_bias, has_res
    PR, PQ = SEP_TILE[layout]
    NCHW = layout == "NCHW"

    def kernel(x,     # (N, C, H, W) or (N, H, W, C) flattened
               dw_w,  # (CM, KH, KW) flattened depthwise weights
               pw_w,  # (CO, CM) flattened pointwise weights
               b,     # (CO,) bias (ignored unless HAS_BIAS)
               dw_b,  # (CM,) depthwise bias (ignored unless HAS_DW_BIAS)
               R,     # residual shaped like y (ignored unless HAS_RES)
               y,     # (N, CO, OH, OW) or (N, OH, OW, CO) flattened: every element written
               N, C, H, W, M, OH, OW, CO,  # sizes (CM = C*M intermediate channels)
               sh, sw, dh, dw, pt, pl,  # depthwise stride, dilation, top/left padding
               kh, kw):  # kernel size (generic path)
        KH_ = kh if KH == 0 else KH
        KW_ = kw if KW == 0 else KW
        KK = KH_ * KW_
        CM = C * M
        tid = cuda.threadIdx.x
        tiles_q = (OW + PQ - 1) // PQ
        tiles_r = (OH + PR - 1) // PR
        bid = I64(cuda.blockIdx.x)
        tq = bid % tiles_q
        bid //= tiles_q
        tr = bid % tiles_r
        n = bid // tiles_r
        oh0 = tr * PR
        ow0 = tq * PQ
        ih0 = oh0 * sh - pt
        iw0 = ow0 * sw - pl
        IH_S = (PR - 1) * sh + (KH_ - 1) * dh + 1
        IW_S = (PQ - 1) * sw + (KW_ - 1) * dw + 1
        HS = IH_S * IW_S
        sm = cuda.shared.array(0, ACC)
        MID = BK * PAD  # offset of the intermediate tile; the A slice comes first
        XS = MID + CM * PIX  # offset of the input halo
        # ---- phase 1: depthwise into shared memory, XC intermediate channels per step
        cmi = tid // PIX
        pix = tid - cmi * PIX
        pr = pix // PQ
        pq = pix - pr * PQ
        for cm0 in range(0, CM, XC):
            ci_lo = cm0 // M
            ci_hi = min(CM - 1, cm0 + XC - 1) // M
            cuda.syncthreads()
            for e in range(tid, XC * HS, THREADS):
                cil = e // HS
                r = (e - cil * HS) // IW_S
                h = ih0 + r
                ww = iw0 + e - cil * HS - r * IW_S
                ci = ci_lo + cil
                v = ZERO
                if ci <= ci_hi and h >= 0 and h < H and ww >= 0 and ww < W:
                    if NCHW:
                        v = ACC(x[((n * C + ci) * H + h) * W + ww])
                    else:
                        v = ACC(x[((n * H + h) * W + ww) * C + ci])
                sm[XS + e] = v
            cuda.syncthreads()
            cm = cm0 + cmi
            if cm < CM:
                base = XS + (cm // M - ci_lo) * HS
                acc = ZERO
                for a in range(KH_):
                    for bb in range(KW_):
                        acc += ACC(dw_w[cm * KK + a * KW_ + bb]) * \
                            sm[base + (pr * sh + a * dh) * IW_S + pq * sw + bb * dw]
                if HAS_DW_BIAS:
                    acc += ACC(dw_b[cm])
                sm[MID + cm * PIX + pix] = DW_ACT(acc)
        # ---- phase 2: PW (CO x CM) @ mid (CM x PIX) from shared memory, epilogue, one store
        tx = tid % TPR
        ty = tid // TPR
        accm = cuda.local.array((TM, TN), ACC)
        ar = cuda.local.array(TM, ACC)
        br = cuda.local.array(TN, ACC)
        for o0 in range(0, CO, BM):
            for i in range(TM):
                for j in range(TN):
                    accm[i, j] = ZERO
            for k0 in range(0, CM, BK):
                cuda.syncthreads()  # phase 1 / previous slice done
                for l in range(BK * BM // THREADS):
                    e = tid + l * THREADS
                    mm = e // BK
                    kk = e - mm * BK
                    v = ZERO
                    if o0 + mm < CO and k0 + kk < CM:
                        v = ACC(pw_w[(o0 + mm) * CM + k0 + kk])
                    sm[kk * PAD + mm] = v
                cuda.syncthreads()
                kmax = min(BK, CM - k0)
                for kk in range(kmax):
                    for i in range(TM):
                        ar[i] = sm[kk * PAD + (ty if NCHW else tx) + i * TPR]
                    for j in range(TN):
                        br[j] = sm[MID + (k0 + kk) * PIX + (tx if NCHW else ty) + j * TPR]
                    for i in range(TM):
                        for j in range(TN):
                            accm[i, j] += ar[i] * br[j]
            for i in range(TM):
                o = o0 + (ty if NCHW else tx) + i * TPR
                for j in range(TN):
                    pp = (tx if NCHW else ty) + j * TPR
                    r = pp // PQ
                    oh = oh0 + r
                    ow = ow0 + pp - r * PQ
                    if o < CO and oh < OH and ow < OW:
                        v = accm[i, j]
                        if HAS_BIAS:
                            v += ACC(b[o])
                        v = ACT(v)
                        if NCHW:
                            idx = ((n * CO + o) * OH + oh) * OW + ow
                        else:
                            idx = ((n * OH + oh) * OW + ow) * CO + o
                        if HAS_RES:
                            v += ACC(R[idx])
                        y[idx] = v

    sig = (arr(dt),) * 7 + (I64,) * 16
    name = (f"separable_fused_{layout}_k{KH}x{KW}_{dt}_{dw_act}_{act}_dwbias{int(has_dw_bias)}"
            f"_bias{int(has_bias)}_res{int(has_res)}")
    return make_kernel(kernel, sig, name)


def separable_grid(sp):
    p = sp.dw
    r, q = SEP_TILE[p.layout]
    return p.N * (-(-p.OH // r)) * (-(-p.OW // q))
