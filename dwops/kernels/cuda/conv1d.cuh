// Depthwise 1-d convolution kernels: forward, one-pass backward, decode update, final state.
// Requires common.cuh before it.
//
// Math (cross-correlation; n batch, c input channel, o = c*M + m output channel, l output
// position, k tap, W = d*(K-1); xp = x with pl values on the left (zeros, or the causal state
// `state[n, c, :]`) and zeros on the right):
//
//   forward     y[n,o,l]   = act( sum_k w[o,k] * xp[n, c, l*s + k*d] * mask(l,k) + bias[o] )
//   backward    gxp[n,c,P] = sum_{m,k: (P - k*d) % s == 0, l = (P - k*d)/s in [0, OL)}
//                            w[o,k] * gy[n,o,l] * mask(l,k)         (padded position P = q + pl)
//               grad_input = gxp[..., pl:], grad_initial_state = gxp[..., :pl] (causal, pl == W)
//               gw[o,k]    = sum_{n,l} gy[n,o,l] * xp[n,c,l*s + k*d] * mask(l,k),  gb[o] = sum gy
//   mask(l,k)   = seq[n, max(src, 0)] == seq[n, l], src = l - (K-1-k)*d (causal, stride 1; 1
//               without seq_idx): a tap never reads another packed sequence
//   update      window = concat(state, x) per (n, c); y[n,o,t] = act(sum_k w[o,k] window[t+k] + b)
//               state_out = window[T:]
//   final state fs[n,c,j] = concat(state or zeros, x)[n, c, L + j], j < W
//
// Layouts: "NCL" x (N, C, L), y (N, C*M, OL); "NLC" x (N, L, C), y (N, OL, C*M); weights
// (C*M, 1, K) as (C*M, K); states (N, C, W); seq (N, L) int32.
// Template parameters:
//   T    element type (__half, __nv_bfloat16, float, double); accumulation in Acc<T>::type
//   K    kernel width known at compile time (2..8), 0 = runtime width KW (1 and 9..31)
//   VEC  elements per global vector access (16 bytes / sizeof(T), or 1 when rows or pointers are
//        not aligned to 16 bytes): NCL along L, NLC along channels
//   NLC  layout of x, y, gy, gx
//
// NCL (one block per (n, c) row and a range of chunks of TL = 128 * PER outputs, PER = VEC *
// C1_OPT): the input span of a chunk (and, backward, the grad_output span of each of the M output
// rows) is staged in shared memory by cp.async, 16-byte copies (the zero-fill form past the row
// ends, the causal state read for positions before 0), in a two-stage pipeline: chunk j + 1 is in
// flight while chunk j is computed. Thread t computes outputs l0 + t + i*128 (i < PER), so a warp
// reads consecutive shared words (no bank conflicts at stride 1) and stores consecutive elements.
// NLC (thread = one vector of VEC channels, a segment of LS positions): with a compile-time width,
// stride 1 and dilation 1 the thread walks its segment with a register window of the last K
// inputs (and grad_outputs), so each input is loaded once per segment plus a K-1 halo; other
// cases read each tap through L1.
// grad_weight and grad_bias are two-stage deterministic reductions: each block writes one partial
// sum per (split, o, k) in a fixed order, sum_splits (common.cuh) adds the splits.
#define C1_THREADS 128
#define C1_OPT 2  // NCL: outputs per thread and chunk, in units of VEC

// ------------------------------------------------------------------------------ shared helpers

// One VEC-element copy global -> shared: cp.async when it moves 4, 8 or 16 bytes, else (a single
// 16-bit element) a plain load and store. valid == false writes zeros without reading.
template <typename T, int VEC>
__device__ __forceinline__ void c1_copy(T* dst, const T* src, bool valid) {
    constexpr int BYTES = static_cast<int>(sizeof(T)) * VEC;
    if constexpr (BYTES >= 4) {
        cp_async<BYTES>(dst, src, valid);
    } else {
        *dst = valid ? *src : zero_value<T>();
    }
}

// Stage dst[v*VEC + e] = value at position a0 + v*VEC + e of a row of length len, for v < nv:
// row[q] for 0 <= q < len, srow[W + q] for -W <= q < 0 when srow (the causal state), else 0.
// a0 % VEC == 0, and VEC > 1 requires len % VEC == 0 and row 16-byte aligned, so every vector is
// wholly inside or wholly outside the row.
template <typename T, int VEC>
__device__ __forceinline__ void c1_stage(T* __restrict__ dst, const T* __restrict__ row, int len,
                                         const T* __restrict__ srow, int W, int a0, int nv,
                                         int tid, int nthr) {
    for (int v = tid; v < nv; v += nthr) {
        const int q = a0 + v * VEC;
        T* dv = dst + v * VEC;
        if (q >= 0 && q < len) {
            c1_copy<T, VEC>(dv, row + q, true);
        } else if (q < 0 && srow != nullptr && q + VEC > -W) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) dv[e] = q + e >= -W ? srow[W + q + e] : zero_value<T>();
        } else {
            c1_copy<T, VEC>(dv, row, false);
        }
    }
}

// VEC channels c0.. of x at position q of image n (NLC): x, the causal state, or zeros.
template <typename T, int VEC>
__device__ __forceinline__ void c1_load_nlc(typename Acc<T>::type (&v)[VEC], const T* __restrict__ x,
                                            const T* __restrict__ state, i64 n, int q, int c0,
                                            int L, int C, int W) {
    if (q >= 0 && q < L) {
        const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(x + ((i64)n * L + q) * C + c0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = to_acc(p.v[e]);
    } else if (q < 0 && state != nullptr && q >= -W) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = to_acc(state[((i64)n * C + c0 + e) * W + W + q]);
    } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = 0;
    }
}

// VEC channels o0.. of gy at output position l of image n (NLC), zeros outside [0, OL).
template <typename T, int VEC>
__device__ __forceinline__ void c1_load_gy(typename Acc<T>::type (&v)[VEC], const T* __restrict__ gy,
                                           i64 n, int l, int o0, int OL, int CO) {
    if (l >= 0 && l < OL) {
        const Pack<T, VEC> p = *reinterpret_cast<const Pack<T, VEC>*>(gy + ((i64)n * OL + l) * CO + o0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = to_acc(p.v[e]);
    } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = 0;
    }
}

__device__ __forceinline__ int c1_seq(const int* __restrict__ seq, i64 n, int L, int q) {
    return seq[(i64)n * L + min(max(q, 0), L - 1)];
}

// ------------------------------------------------------------------------------ forward

// Launch (cupy_plans.plan_conv1d_forward):
//   NCL  grid (N*C, ceil(chunks / per)), block (128), TL = 128 * PER outputs per chunk, chunks
//        [blockIdx.y * per, ...) of row blockIdx.x; dynamic shared memory 2 * IP elements of T
//   NLC  grid (ceil(CV / BX), ceil(segments / BY), min(N, 65535)), block (BX, BY), CV = CO / VEC
//        channel vectors, LS outputs per segment; no shared memory
template <typename T, int K, int VEC, bool NLC>
__global__ void __launch_bounds__(C1_THREADS) c1_forward(
    const T* __restrict__ x,      // (N, C, L) or (N, L, C)
    const T* __restrict__ w,      // (C*M, KW)
    const T* __restrict__ bias,   // (C*M,) or nullptr
    const T* __restrict__ state,  // (N, C, W) or nullptr
    const int* __restrict__ seq,  // (N, L) or nullptr
    T* __restrict__ y,            // (N, C*M, OL) or (N, OL, C*M)
    int N, int C, int L, int M, int KW, int OL, int s, int d, int pl, int act,
    int TL, int IP, int per, int LS)
{
    typedef typename Acc<T>::type A;
    constexpr int PER = VEC * C1_OPT;  // NCL: outputs per thread and chunk
    const int kw = K > 0 ? K : KW;
    const int W = d * (kw - 1);
    const int CO = C * M;
    if constexpr (!NLC) {
        extern __shared__ __align__(16) unsigned char smem_raw[];
        T* tiles = reinterpret_cast<T*>(smem_raw);
        const int tid = threadIdx.x, nthr = blockDim.x;
        const i64 row = blockIdx.x;  // n * C + c
        const i64 n = row / C;
        const int c = (int)(row % C);
        const T* xrow = x + row * L;
        const T* srow = state != nullptr ? state + row * W : nullptr;
        const int nch = (OL + TL - 1) / TL;
        const int j0 = blockIdx.y * per, j1 = min(nch, j0 + per);
        auto stage = [&](int j, T* buf) {
            const int a0 = floor_div(j * TL * s - pl, VEC) * VEC;
            c1_stage<T, VEC>(buf, xrow, L, srow, W, a0, IP / VEC, tid, nthr);
        };
        if (j0 < j1) stage(j0, tiles);
        cp_async_commit();
        for (int j = j0; j < j1; ++j) {
            T* cur = tiles + ((j - j0) & 1) * IP;
            if (j + 1 < j1) stage(j + 1, tiles + ((j + 1 - j0) & 1) * IP);
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            const int l0 = j * TL;
            const int off = l0 * s - pl - floor_div(l0 * s - pl, VEC) * VEC;
            unsigned valid[PER];  // tap bits of each output (seq_idx)
#pragma unroll
            for (int i = 0; i < PER; ++i) {
                valid[i] = ~0u;
                const int l = l0 + tid + i * nthr;
                if (seq != nullptr && l < OL) {
                    const int sl = c1_seq(seq, n, L, l);
                    for (int k = 0; k < kw; ++k)
                        if (c1_seq(seq, n, L, l - (kw - 1 - k) * d) != sl) valid[i] &= ~(1u << k);
                }
            }
            for (int m = 0; m < M; ++m) {
                const int o = c * M + m;
                const T* wr = w + (i64)o * kw;
                A acc[PER];
#pragma unroll
                for (int i = 0; i < PER; ++i) acc[i] = 0;
                if constexpr (K > 0) {
                    A wk[K];
#pragma unroll
                    for (int k = 0; k < K; ++k) wk[k] = to_acc(wr[k]);
#pragma unroll
                    for (int i = 0; i < PER; ++i) {
                        const T* t = cur + off + (tid + i * nthr) * s;
#pragma unroll
                        for (int k = 0; k < K; ++k)
                            if (valid[i] >> k & 1u) acc[i] += wk[k] * to_acc(t[k * d]);
                    }
                } else {
                    for (int k = 0; k < kw; ++k) {
                        const A wv = to_acc(wr[k]);
#pragma unroll
                        for (int i = 0; i < PER; ++i)
                            if (valid[i] >> k & 1u)
                                acc[i] += wv * to_acc(cur[off + (tid + i * nthr) * s + k * d]);
                    }
                }
                const A bv = bias != nullptr ? to_acc(bias[o]) : A(0);
                T* yrow = y + (n * CO + o) * OL;
#pragma unroll
                for (int i = 0; i < PER; ++i) {
                    const int l = l0 + tid + i * nthr;
                    if (l < OL) yrow[l] = from_acc<T>(activate(acc[i] + bv, act));
                }
            }
            __syncthreads();  // every read of `cur` is done before it is staged again
        }
        cp_async_wait<0>();
    } else {
        const int CV = CO / VEC;
        const int cv = blockIdx.x * blockDim.x + threadIdx.x;
        const int seg = blockIdx.y * blockDim.y + threadIdx.y;
        if (cv >= CV) return;  // no barriers below
        const int o0 = cv * VEC, c0 = o0 / M;  // VEC > 1 only with M == 1
        const int lb = seg * LS, le = min(OL, lb + LS);
        A bv[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) bv[e] = bias != nullptr ? to_acc(bias[o0 + e]) : A(0);
        for (i64 n = blockIdx.z; n < N; n += gridDim.z) {
            if (lb >= le) break;
            T* yn = y + (i64)n * OL * CO + o0;
            if (K > 0 && s == 1 && d == 1) {
                constexpr int KK = K > 0 ? K : 1;
                A wk[KK][VEC], win[KK][VEC];
                int sq[KK];
#pragma unroll
                for (int k = 0; k < KK; ++k)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) wk[k][e] = to_acc(w[(i64)(o0 + e) * KK + k]);
#pragma unroll
                for (int k = 0; k < KK - 1; ++k) {
                    c1_load_nlc<T, VEC>(win[k], x, state, n, lb + k - pl, c0, L, C, W);
                    sq[k] = seq != nullptr ? c1_seq(seq, n, L, lb - (KK - 1) + k) : 0;
                }
#pragma unroll 4  // the loads of four positions in flight (they do not depend on the math)
                for (int l = lb; l < le; ++l) {
                    c1_load_nlc<T, VEC>(win[KK - 1], x, state, n, l + KK - 1 - pl, c0, L, C, W);
                    sq[KK - 1] = seq != nullptr ? c1_seq(seq, n, L, l) : 0;
                    Pack<T, VEC> out;
#pragma unroll
                    for (int e = 0; e < VEC; ++e) {
                        A acc = 0;
#pragma unroll
                        for (int k = 0; k < KK; ++k)
                            if (sq[k] == sq[KK - 1]) acc += wk[k][e] * win[k][e];
                        out.v[e] = from_acc<T>(activate(acc + bv[e], act));
                    }
                    *reinterpret_cast<Pack<T, VEC>*>(yn + (i64)l * CO) = out;
#pragma unroll
                    for (int k = 0; k < KK - 1; ++k) {
                        sq[k] = sq[k + 1];
#pragma unroll
                        for (int e = 0; e < VEC; ++e) win[k][e] = win[k + 1][e];
                    }
                }
            } else {
                for (int l = lb; l < le; ++l) {
                    const int sl = seq != nullptr ? c1_seq(seq, n, L, l) : 0;
                    A acc[VEC];
#pragma unroll
                    for (int e = 0; e < VEC; ++e) acc[e] = 0;
                    for (int k = 0; k < kw; ++k) {
                        if (seq != nullptr && c1_seq(seq, n, L, l - (kw - 1 - k) * d) != sl) continue;
                        A v[VEC];
                        c1_load_nlc<T, VEC>(v, x, state, n, l * s + k * d - pl, c0, L, C, W);
#pragma unroll
                        for (int e = 0; e < VEC; ++e) acc[e] += to_acc(w[(i64)(o0 + e) * kw + k]) * v[e];
                    }
                    Pack<T, VEC> out;
#pragma unroll
                    for (int e = 0; e < VEC; ++e) out.v[e] = from_acc<T>(activate(acc[e] + bv[e], act));
                    *reinterpret_cast<Pack<T, VEC>*>(yn + (i64)l * CO) = out;
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------ backward

// Column sums over threadIdx.y (NLC blocks): for each of the VEC values of each thread, the sum
// over the BY threads of its column, added in threadIdx.y order; returned on threadIdx.y == 0.
template <typename A, int VEC>
__device__ __forceinline__ void c1_colsum(A* red, A (&v)[VEC]) {
    const int BX = blockDim.x;
    A* slot = red + ((i64)threadIdx.y * BX + threadIdx.x) * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) slot[e] = v[e];
    __syncthreads();
    if (threadIdx.y == 0) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            A t = 0;
            for (int r = 0; r < (int)blockDim.y; ++r) t += red[((i64)r * BX + threadIdx.x) * VEC + e];
            v[e] = t;
        }
    }
    __syncthreads();
}

// Launch (cupy_plans.plan_conv1d_backward):
//   NCL  grid (N*C, ceil(chunks / per)), block (128), TL = 128 * PER; chunk j: outputs
//        [j*TL, (j+1)*TL) for gw/gb
//        and input positions [qa + j*TQ, qa + (j+1)*TQ) for gx (TQ = TL*s, qa = the first
//        VEC-aligned position <= -pl); dynamic shared memory 2 * (IPX + M*IPG) elements of T
//        (16-byte aligned) + (M*KW + (4 + M) * (KW+1)) accumulators
//   NLC  grid (ceil(CV / BX), ceil(segments / BY), min(N, 65535)), block (BX, BY), CV = C / VEC;
//        dynamic shared memory BX * BY * VEC accumulators
// Partial sums: part_w (splits, C*M*KW), part_b (splits, C*M); split = n * gridDim.y + blockIdx.y.
template <typename T, int K, int VEC, bool NLC>
__global__ void __launch_bounds__(C1_THREADS) c1_backward(
    const T* __restrict__ x,      // (N, C, L) or (N, L, C)
    const T* __restrict__ gy,     // (N, C*M, OL) or (N, OL, C*M)
    const T* __restrict__ w,      // (C*M, KW)
    const T* __restrict__ state,  // (N, C, W) or nullptr
    const int* __restrict__ seq,  // (N, L) or nullptr
    T* __restrict__ gx,           // like x, or nullptr
    T* __restrict__ gstate,       // (N, C, W) or nullptr
    typename Acc<T>::type* __restrict__ part_w,  // (splits, C*M*KW) or nullptr
    typename Acc<T>::type* __restrict__ part_b,  // (splits, C*M) or nullptr
    int N, int C, int L, int M, int KW, int OL, int s, int d, int pl,
    int TL, int IPX, int IPG, int per, int LS)
{
    typedef typename Acc<T>::type A;
    constexpr int PER = VEC * C1_OPT;  // NCL: outputs per thread and chunk
    const int kw = K > 0 ? K : KW;
    const int W = d * (kw - 1);
    const int CO = C * M;
    const bool want_gx = gx != nullptr || gstate != nullptr;
    const bool want_gw = part_w != nullptr || part_b != nullptr;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    if constexpr (!NLC) {
        const int tid = threadIdx.x, nthr = blockDim.x, lane = tid & 31, warp = tid >> 5;
        const int nwarps = nthr >> 5, KB = kw + 1;
        T* tiles = reinterpret_cast<T*>(smem_raw);
        const int stage_elems = IPX + M * IPG;
        A* wsh = reinterpret_cast<A*>(smem_raw + ((2 * (i64)stage_elems * sizeof(T) + 15) / 16) * 16);
        A* red = wsh + M * kw;          // (nwarps, KW + 1)
        A* accs = red + nwarps * KB;    // (M, KW + 1): this block's sums of gw and gb
        const i64 row = blockIdx.x;     // n * C + c
        const i64 n = row / C;
        const int c = (int)(row % C);
        const T* xrow = x + row * L;
        const T* srow = state != nullptr ? state + row * W : nullptr;
        const int TQ = TL * s;
        const int qa = floor_div(-pl, VEC) * VEC;
        const int nch = max((OL + TL - 1) / TL, (L - qa + TQ - 1) / TQ);
        const int j0 = blockIdx.y * per, j1 = min(nch, j0 + per);
        for (int i = tid; i < M * kw; i += nthr) wsh[i] = to_acc(w[(i64)c * M * kw + i]);
        for (int i = tid; i < M * KB; i += nthr) accs[i] = 0;
        // gy tile of chunk j starts at the aligned position <= min(first gy position gx reads, l0)
        auto gy_start = [&](int j) {
            const int lo = min(ceil_div(qa + j * TQ + pl - W, s), j * TL);
            return floor_div(lo, VEC) * VEC;
        };
        auto stage = [&](int j, T* buf) {
            c1_stage<T, VEC>(buf, xrow, L, srow, W, floor_div(j * TL * s - pl, VEC) * VEC, IPX / VEC,
                             tid, nthr);
            const int ga = gy_start(j);
            for (int m = 0; m < M; ++m)
                c1_stage<T, VEC>(buf + IPX + m * IPG, gy + (n * CO + (i64)c * M + m) * OL, OL,
                                 nullptr, 0, ga, IPG / VEC, tid, nthr);
        };
        if (j0 < j1) stage(j0, tiles);
        cp_async_commit();
        for (int j = j0; j < j1; ++j) {
            T* cur = tiles + ((j - j0) & 1) * stage_elems;
            if (j + 1 < j1) stage(j + 1, tiles + ((j + 1 - j0) & 1) * stage_elems);
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            const T* xt = cur;
            const int ga = gy_start(j);
            if (want_gx) {
                for (int u = tid; u < TQ; u += nthr) {
                    const int q = qa + j * TQ + u;
                    if (q < -pl || q >= L) continue;
                    const int P = q + pl;
                    const int sq = seq != nullptr ? c1_seq(seq, n, L, q) : 0;
                    A acc = 0;
                    for (int m = 0; m < M; ++m) {
                        const T* gt = cur + IPX + m * IPG - ga;
                        const A* wm = wsh + m * kw;
#pragma unroll
                        for (int k = 0; k < (K > 0 ? K : kw); ++k) {
                            const int r = P - k * d;
                            if (r < 0) break;
                            if (s != 1 && r % s != 0) continue;
                            const int l = r / s;
                            if (l >= OL) continue;
                            if (seq != nullptr && c1_seq(seq, n, L, l) != sq) continue;
                            acc += wm[k] * to_acc(gt[l]);
                        }
                    }
                    if (q >= 0) {
                        if (gx != nullptr) gx[row * L + q] = from_acc<T>(acc);
                    } else if (gstate != nullptr) {
                        gstate[row * W + W + q] = from_acc<T>(acc);
                    }
                }
            }
            if (want_gw) {
                const int l0 = j * TL;
                const int off = l0 * s - pl - floor_div(l0 * s - pl, VEC) * VEC;
                unsigned valid[PER];
#pragma unroll
                for (int i = 0; i < PER; ++i) {
                    const int l = l0 + tid + i * nthr;
                    valid[i] = l < OL ? ~0u : 0u;
                    if (seq != nullptr && l < OL) {
                        const int sl = c1_seq(seq, n, L, l);
                        for (int k = 0; k < kw; ++k)
                            if (c1_seq(seq, n, L, l - (kw - 1 - k) * d) != sl) valid[i] &= ~(1u << k);
                    }
                }
                for (int m = 0; m < M; ++m) {
                    const T* gt = cur + IPX + m * IPG - ga;
                    A g[PER];
                    A sb = 0;
#pragma unroll
                    for (int i = 0; i < PER; ++i) {
                        const int l = l0 + tid + i * nthr;
                        g[i] = l < OL ? to_acc(gt[l]) : A(0);
                        sb += g[i];
                    }
                    sb = warp_sum(sb);
                    if (lane == 0) red[warp * KB + kw] = sb;
                    for (int k = 0; k < (K > 0 ? K : kw); ++k) {
                        A sk = 0;
#pragma unroll
                        for (int i = 0; i < PER; ++i)
                            if (valid[i] >> k & 1u)
                                sk += g[i] * to_acc(xt[off + (tid + i * nthr) * s + k * d]);
                        sk = warp_sum(sk);
                        if (lane == 0) red[warp * KB + k] = sk;
                    }
                    __syncthreads();
                    for (int t = tid; t < KB; t += nthr) {
                        A sum = 0;
                        for (int r = 0; r < nwarps; ++r) sum += red[r * KB + t];
                        accs[m * KB + t] += sum;
                    }
                    __syncthreads();
                }
            }
            __syncthreads();  // every read of `cur` is done before it is staged again
        }
        cp_async_wait<0>();
        if (want_gw) {
            const i64 split = n * gridDim.y + blockIdx.y;
            for (int t = tid; t < M * KB; t += nthr) {
                const int m = t / KB, k = t - m * KB;
                const i64 o = (i64)c * M + m;
                if (k < kw) {
                    if (part_w != nullptr) part_w[split * CO * kw + o * kw + k] = accs[t];
                } else if (part_b != nullptr) {
                    part_b[split * CO + o] = accs[t];
                }
            }
        }
    } else {
        A* red = reinterpret_cast<A*>(smem_raw);  // (BY, BX, VEC)
        const int CV = C / VEC;
        const int cv = blockIdx.x * blockDim.x + threadIdx.x;
        const int seg = blockIdx.y * blockDim.y + threadIdx.y;
        const bool active = cv < CV;  // inactive threads still take part in the barriers
        const int c0 = active ? cv * VEC : 0;
        const int Pend = pl + L;      // gx covers padded positions [0, pl + L)
        for (i64 n = blockIdx.z; n < N; n += gridDim.z) {
            const i64 split = n * gridDim.y + blockIdx.y;
            if (K > 0 && s == 1 && d == 1 && M == 1) {
                // Walk index l: x head xp[l + K - 1], gy head gy[l]; emits gx at padded position
                // l (needs gy[l-K+1 .. l]) and the gw/gb terms of output l (xp[l .. l+K-1]).
                constexpr int KK = K > 0 ? K : 1;
                const int lb = seg * LS, le = min(max(Pend, OL), lb + LS);
                A wk[KK][VEC], xw[KK][VEC], gw_[KK][VEC], sw[KK][VEC], sb[VEC];
                int sq[KK];
#pragma unroll
                for (int k = 0; k < KK; ++k)
#pragma unroll
                    for (int e = 0; e < VEC; ++e) {
                        wk[k][e] = active ? to_acc(w[(i64)(c0 + e) * KK + k]) : A(0);
                        sw[k][e] = 0;
                    }
#pragma unroll
                for (int e = 0; e < VEC; ++e) sb[e] = 0;
                if (active && lb < le) {
#pragma unroll
                    for (int k = 0; k < KK - 1; ++k) {
                        c1_load_nlc<T, VEC>(xw[k], x, state, n, lb + k - pl, c0, L, C, W);
                        c1_load_gy<T, VEC>(gw_[k], gy, n, lb - (KK - 1) + k, c0, OL, CO);
                        sq[k] = seq != nullptr ? c1_seq(seq, n, L, lb - (KK - 1) + k) : 0;
                    }
#pragma unroll 4  // the loads of four positions in flight
                    for (int l = lb; l < le; ++l) {
                        c1_load_nlc<T, VEC>(xw[KK - 1], x, state, n, l + KK - 1 - pl, c0, L, C, W);
                        c1_load_gy<T, VEC>(gw_[KK - 1], gy, n, l, c0, OL, CO);
                        sq[KK - 1] = seq != nullptr ? c1_seq(seq, n, L, l) : 0;
                        const int q = l - pl;
                        if (want_gx && l < Pend && (q >= 0 ? gx != nullptr : gstate != nullptr)) {
                            // src of every term is q: seq[max(q, 0)] = sq[0] (pl == K-1 with seq)
                            Pack<T, VEC> out;
#pragma unroll
                            for (int e = 0; e < VEC; ++e) {
                                A acc = 0;
#pragma unroll
                                for (int k = 0; k < KK; ++k)
                                    if (sq[KK - 1 - k] == sq[0]) acc += wk[k][e] * gw_[KK - 1 - k][e];
                                out.v[e] = from_acc<T>(acc);
                            }
                            if (q >= 0) {
                                *reinterpret_cast<Pack<T, VEC>*>(gx + ((i64)n * L + q) * C + c0) = out;
                            } else {
#pragma unroll
                                for (int e = 0; e < VEC; ++e)
                                    gstate[((i64)n * C + c0 + e) * W + W + q] = out.v[e];
                            }
                        }
                        if (want_gw && l < OL) {
#pragma unroll
                            for (int e = 0; e < VEC; ++e) {
                                const A g = gw_[KK - 1][e];
                                sb[e] += g;
#pragma unroll
                                for (int k = 0; k < KK; ++k)
                                    if (sq[k] == sq[KK - 1]) sw[k][e] += g * xw[k][e];
                            }
                        }
#pragma unroll
                        for (int k = 0; k < KK - 1; ++k) {
                            sq[k] = sq[k + 1];
#pragma unroll
                            for (int e = 0; e < VEC; ++e) {
                                xw[k][e] = xw[k + 1][e];
                                gw_[k][e] = gw_[k + 1][e];
                            }
                        }
                    }
                }
                if (want_gw) {
#pragma unroll
                    for (int k = 0; k < KK + 1; ++k) {
                        A v[VEC];
#pragma unroll
                        for (int e = 0; e < VEC; ++e) v[e] = k < KK ? sw[k][e] : sb[e];
                        c1_colsum<A, VEC>(red, v);
                        if (threadIdx.y == 0 && active) {
#pragma unroll
                            for (int e = 0; e < VEC; ++e) {
                                const i64 o = c0 + e;
                                if (k < KK && part_w != nullptr) part_w[split * CO * KK + o * KK + k] = v[e];
                                if (k == KK && part_b != nullptr) part_b[split * CO + o] = v[e];
                            }
                        }
                    }
                }
            } else {
                // Any stride, dilation, width and multiplier (VEC > 1 only with M == 1): outputs
                // [lb, le) for gw/gb, padded positions [lb*s, min((seg+1)*LS*s, pl+L)) for gx.
                const int lb = seg * LS, le = min(OL, lb + LS);
                const int pb = lb * s, pe = min((seg + 1) * LS * s, Pend);
                if (want_gx && active) {
                    for (int P = pb; P < pe; ++P) {
                        const int q = P - pl;
                        if (q >= 0 ? gx == nullptr : gstate == nullptr) continue;
                        const int sq = seq != nullptr ? c1_seq(seq, n, L, q) : 0;
                        A acc[VEC];
#pragma unroll
                        for (int e = 0; e < VEC; ++e) acc[e] = 0;
                        for (int m = 0; m < M; ++m) {
                            for (int k = 0; k < kw; ++k) {
                                const int r = P - k * d;
                                if (r < 0) break;
                                if (r % s != 0) continue;
                                const int l = r / s;
                                if (l >= OL) continue;
                                if (seq != nullptr && c1_seq(seq, n, L, l) != sq) continue;
                                A g[VEC];
                                c1_load_gy<T, VEC>(g, gy, n, l, c0 * M + m, OL, CO);
#pragma unroll
                                for (int e = 0; e < VEC; ++e)
                                    acc[e] += to_acc(w[((i64)(c0 + e) * M + m) * kw + k]) * g[e];
                            }
                        }
                        if (q >= 0) {
                            Pack<T, VEC> out;
#pragma unroll
                            for (int e = 0; e < VEC; ++e) out.v[e] = from_acc<T>(acc[e]);
                            *reinterpret_cast<Pack<T, VEC>*>(gx + ((i64)n * L + q) * C + c0) = out;
                        } else {
#pragma unroll
                            for (int e = 0; e < VEC; ++e)
                                gstate[((i64)n * C + c0 + e) * W + W + q] = from_acc<T>(acc[e]);
                        }
                    }
                }
                if (want_gw) {
                    for (int m = 0; m < M; ++m) {
                        for (int k = 0; k <= kw; ++k) {  // k == kw: the bias
                            A v[VEC];
#pragma unroll
                            for (int e = 0; e < VEC; ++e) v[e] = 0;
                            for (int l = lb; active && l < le; ++l) {
                                if (k < kw && seq != nullptr &&
                                    c1_seq(seq, n, L, l - (kw - 1 - k) * d) != c1_seq(seq, n, L, l))
                                    continue;
                                A g[VEC], xv[VEC];
                                c1_load_gy<T, VEC>(g, gy, n, l, c0 * M + m, OL, CO);
                                if (k < kw) {
                                    c1_load_nlc<T, VEC>(xv, x, state, n, l * s + k * d - pl, c0, L, C, W);
                                } else {
#pragma unroll
                                    for (int e = 0; e < VEC; ++e) xv[e] = 1;
                                }
#pragma unroll
                                for (int e = 0; e < VEC; ++e) v[e] += g[e] * xv[e];
                            }
                            c1_colsum<A, VEC>(red, v);
                            if (threadIdx.y == 0 && active) {
#pragma unroll
                                for (int e = 0; e < VEC; ++e) {
                                    const i64 o = (i64)(c0 + e) * M + m;
                                    if (k < kw && part_w != nullptr) part_w[split * CO * kw + o * kw + k] = v[e];
                                    if (k == kw && part_b != nullptr) part_b[split * CO + o] = v[e];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------ decode update

// One thread per (n, c): reads its state row and each output channel's weights once, computes T
// tokens for the M output channels, then writes state_out (which may be `state` itself: every
// read of the row happens before the first write, and no other thread touches it).
//   grid (ceil(N*C / 128)), block (128)
template <typename T, int K>
__global__ void __launch_bounds__(C1_THREADS) c1_update(
    const T* __restrict__ x,      // (N, C, T)
    const T* state,               // (N, C, K-1); may alias state_out
    const T* __restrict__ w,      // (C*M, KW)
    const T* __restrict__ bias,   // (C*M,) or nullptr
    T* __restrict__ y,            // (N, C*M, T)
    T* state_out,                 // (N, C, K-1)
    int N, int C, int M, int KW, int Tn, int act)
{
    typedef typename Acc<T>::type A;
    constexpr int KS = K > 0 ? K : 32;  // registers (K > 0: constant indices) or local storage
    const int kw = K > 0 ? K : KW;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)N * C) return;
    const i64 n = idx / C;
    const int c = (int)(idx % C);
    const T* xr = x + idx * Tn;
    A st[KS];
#pragma unroll
    for (int i = 0; i < KS - 1; ++i)
        if (i < kw - 1) st[i] = to_acc(state[idx * (kw - 1) + i]);
    // win[k] = concat(state, x)[t + k] while token t is computed; after the last token the
    // first kw-1 entries are the new state
    A win[KS];
    for (int m = 0; m < M; ++m) {
        const i64 o = (i64)c * M + m;
        A wk[KS];
#pragma unroll
        for (int k = 0; k < KS; ++k)
            if (k < kw) wk[k] = to_acc(w[o * kw + k]);
        const A bv = bias != nullptr ? to_acc(bias[o]) : A(0);
#pragma unroll
        for (int i = 0; i < KS - 1; ++i)
            if (i < kw - 1) win[i] = st[i];
        for (int t = 0; t < Tn; ++t) {
            win[kw - 1] = to_acc(xr[t]);
            A acc = 0;
#pragma unroll
            for (int k = 0; k < KS; ++k)
                if (k < kw) acc += wk[k] * win[k];
            y[(n * C * M + o) * Tn + t] = from_acc<T>(activate(acc + bv, act));
#pragma unroll
            for (int i = 0; i < KS - 1; ++i)
                if (i < kw - 1) win[i] = win[i + 1];
        }
    }
#pragma unroll
    for (int i = 0; i < KS - 1; ++i)
        if (i < kw - 1) state_out[idx * (kw - 1) + i] = from_acc<T>(win[i]);
}

// ------------------------------------------------------------------------------ final state

// fs[n, c, j] = concat(state or zeros, x)[n, c, L + j] for j < W: x[n, c, L - W + j] when that
// position is >= 0, else state[n, c, L + j] (or 0).   grid (ceil(N*C*W / 128)), block (128)
template <typename T, bool NLC>
__global__ void __launch_bounds__(C1_THREADS) c1_final_state(
    const T* __restrict__ x,      // (N, C, L) or (N, L, C)
    const T* __restrict__ state,  // (N, C, W) or nullptr
    T* __restrict__ fs,           // (N, C, W)
    int N, int C, int L, int W)
{
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (i64)N * C * W) return;
    const int j = (int)(idx % W);
    const i64 nc = idx / W;
    const i64 n = nc / C;
    const int c = (int)(nc % C);
    const int q = L - W + j;
    T v;
    if (q >= 0) {
        v = NLC ? x[(n * L + q) * C + c] : x[nc * L + q];
    } else {
        v = state != nullptr ? state[nc * W + W + q] : zero_value<T>();
    }
    fs[idx] = v;
}
