"""The ``cpu`` backend's register tiles: Numba intrinsics that emit LLVM vector IR (AVX2-width
vectors, ``llvm.fma``) for the depthwise inner loops (see ``cpu.py``)."""

from __future__ import annotations

from ._cpu_common import JT, PT, RT, VEC_BYTES, _nbtypes, cgutils, intrinsic, ir

# ----------------------------------------------------------------------------- vector IR


def _vector_ir(context, builder, dtype):
    """The LLVM pieces every vector intrinsic below starts from, for element type ``dtype``:
    (W lanes of one VEC_BYTES vector, the vector type, intp, the element alignment in bytes,
    llvm.fma on the vector type, c(v): an intp constant, vptr(base, off): base + off as a
    vector pointer)."""
    W = VEC_BYTES // (dtype.bitwidth // 8)
    vty = ir.VectorType(context.get_value_type(dtype), W)
    intp = context.get_value_type(_nbtypes.intp)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                         f"llvm.fma.v{W}f{dtype.bitwidth}")

    def c(v):
        return ir.Constant(intp, v)

    def vptr(base_ptr, off):
        return builder.bitcast(builder.gep(base_ptr, [off]), vty.as_pointer())

    return W, vty, intp, dtype.bitwidth // 8, fma, c, vptr



@intrinsic
def _dw_tile(typingctx, xf, xoffs, T, wf, woffs, xbase, c0, acc, abase, pix):
    """acc[abase + p*pix + l] += sum_t wf[woffs[t] + c0 + l] * xf[xoffs[t] + xbase + p*pix + l]
    for p < JT pixels and l < 2 vectors of channels (NHWC depthwise, interior pixels).

    xf:       flat input;  xoffs: (T,) int64 offset of each valid tap's input pixel run
    T:        number of valid taps;  wf: flat (KH, KW, C) filters;  woffs: (T,) tap offsets in wf
    xbase:    added to every x offset (j*C + c0);  c0: first channel
    acc:      flat destination row;  abase: offset of (pixel j, channel c0);  pix: pixel stride
    The JT x 2 vector accumulators stay in registers across all taps: per tap 2 weight loads,
    2*JT input loads and 2*JT vector FMAs (the flat per-tap loops need 3 loads and a store per
    FMA).
    """
    sig = _nbtypes.void(xf, xoffs, T, wf, woffs, xbase, c0, acc, abase, pix)

    def codegen(context, builder, signature, args):
        xty, oty, _, wty, _, _, _, aty, _, _ = signature.args
        W, vty, intp, al, fma, c, vptr = _vector_ir(context, builder, xty.dtype)
        X = context.make_array(xty)(context, builder, args[0])
        XO = context.make_array(oty)(context, builder, args[1])
        Tn = args[2]
        Wf = context.make_array(wty)(context, builder, args[3])
        WO = context.make_array(oty)(context, builder, args[4])
        xbase, c0, abase, pix = args[5], args[6], args[8], args[9]
        A = context.make_array(aty)(context, builder, args[7])

        offs = [builder.add(builder.mul(c(p), pix), c(h * W)) for p in range(JT) for h in range(2)]
        init = [builder.load(vptr(A.data, builder.add(abase, o)), align=al) for o in offs]
        entry = builder.basic_block
        loop = builder.append_basic_block("dt.loop")
        done = builder.append_basic_block("dt.done")
        builder.cbranch(builder.icmp_signed(">", Tn, c(0)), loop, done)
        builder.position_at_end(loop)
        t = builder.phi(intp)
        t.add_incoming(c(0), entry)
        accs = []
        for v in init:
            ph = builder.phi(vty)
            ph.add_incoming(v, entry)
            accs.append(ph)
        xo = builder.add(builder.load(builder.gep(XO.data, [t])), xbase)
        wo = builder.add(builder.load(builder.gep(WO.data, [t])), c0)
        wv = [builder.load(vptr(Wf.data, builder.add(wo, c(h * W))), align=al) for h in range(2)]
        new = []
        for k, o in enumerate(offs):
            xv = builder.load(vptr(X.data, builder.add(xo, o)), align=al)
            new.append(builder.call(fma, [wv[k % 2], xv, accs[k]]))
        t1 = builder.add(t, c(1))
        t.add_incoming(t1, loop)
        for ph, v in zip(accs, new):
            ph.add_incoming(v, loop)
        builder.cbranch(builder.icmp_signed("<", t1, Tn), loop, done)
        builder.position_at_end(done)
        res = []
        for v0, v1 in zip(init, new):
            ph = builder.phi(vty)
            ph.add_incoming(v0, entry)
            ph.add_incoming(v1, loop)
            res.append(ph)
        for v, o in zip(res, offs):
            builder.store(v, vptr(A.data, builder.add(abase, o)), align=al)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _dw_rows(typingctx, xp, coffs, KW, KH, rstep, xb, wf, wb, acc, ab):
    """acc[ab + r*rstep + l] += sum_{b<KW, a<KH} wf[wb + a*KW + b] * xp[coffs[b] + xb +
    (r + a)*rstep + l]  for r < RT output rows and l < one vector (NCHW depthwise, stride_h 1).

    xp:       flat padded phase planes;  coffs: (KW,) int64 offset of each tap column
    KW, KH:   kernel size;  rstep: flat distance between consecutive rows (and taps a)
    xb:       flat offset of the tile's first output row and column in xp
    wf:       flat (.., KH, KW) filters;  wb: offset of this plane's filter
    acc:      flat accumulator;  ab: offset of the tile's first output in acc (pitch rstep)
    The RT vector accumulators stay in registers across all taps, and so does a sliding window
    of RT input rows: for tap row a the rows a .. a+RT-1 are needed, a+1 needs one new row, so
    per tap one input load and one filter broadcast feed RT vector FMAs (vs _dw_tile's one
    input load per FMA).
    """
    sig = _nbtypes.void(xp, coffs, KW, KH, rstep, xb, wf, wb, acc, ab)

    def codegen(context, builder, signature, args):
        # IR: entry -> outer (b, acc phis) -> preload RT-1 window rows -> inner (a, acc and
        # window phis) -> outer latch -> done: store
        xty, oty = signature.args[0], signature.args[1]
        W, vty, intp, al, fma, c, vptr = _vector_ir(context, builder, xty.dtype)
        X = context.make_array(xty)(context, builder, args[0])
        CO = context.make_array(oty)(context, builder, args[1])
        KWv, KHv, rs, xb, wb, ab = args[2], args[3], args[4], args[5], args[7], args[9]
        Wf = context.make_array(signature.args[6])(context, builder, args[6])
        A = context.make_array(signature.args[8])(context, builder, args[8])
        i32 = ir.IntType(32)
        mask = ir.Constant(ir.VectorType(i32, W), [0] * W)
        undef = ir.Constant(vty, ir.Undefined)

        def vload(base_ptr, off):
            return builder.load(vptr(base_ptr, off), align=al)

        init = [vload(A.data, builder.add(ab, builder.mul(c(r), rs))) for r in range(RT)]
        entry = builder.basic_block
        outer = builder.append_basic_block("dr.outer")
        inner = builder.append_basic_block("dr.inner")
        latch = builder.append_basic_block("dr.latch")
        done = builder.append_basic_block("dr.done")
        builder.branch(outer)
        builder.position_at_end(outer)
        b = builder.phi(intp)
        b.add_incoming(c(0), entry)
        oacc = []
        for v in init:
            ph = builder.phi(vty)
            ph.add_incoming(v, entry)
            oacc.append(ph)
        colb = builder.add(builder.load(builder.gep(CO.data, [b])), xb)
        win0 = [vload(X.data, builder.add(colb, builder.mul(c(r), rs))) for r in range(RT - 1)]
        outer_end = builder.basic_block
        builder.branch(inner)
        builder.position_at_end(inner)
        a = builder.phi(intp)
        a.add_incoming(c(0), outer_end)
        iacc = []
        for v in oacc:
            ph = builder.phi(vty)
            ph.add_incoming(v, outer_end)
            iacc.append(ph)
        iwin = []
        for v in win0:
            ph = builder.phi(vty)
            ph.add_incoming(v, outer_end)
            iwin.append(ph)
        xnew = vload(X.data, builder.add(colb, builder.mul(builder.add(a, c(RT - 1)), rs)))
        window = iwin + [xnew]
        wsc = builder.load(builder.gep(Wf.data, [builder.add(builder.add(wb, builder.mul(a, KWv)),
                                                             b)]))
        wvec = builder.shuffle_vector(builder.insert_element(undef, wsc, ir.Constant(i32, 0)),
                                      undef, mask)
        nacc = [builder.call(fma, [wvec, window[r], iacc[r]]) for r in range(RT)]
        a1 = builder.add(a, c(1))
        a.add_incoming(a1, inner)
        for ph, v in zip(iacc, nacc):
            ph.add_incoming(v, inner)
        for ph, v in zip(iwin, window[1:]):
            ph.add_incoming(v, inner)
        builder.cbranch(builder.icmp_signed("<", a1, KHv), inner, latch)
        builder.position_at_end(latch)
        b1 = builder.add(b, c(1))
        b.add_incoming(b1, latch)
        for ph, v in zip(oacc, nacc):
            ph.add_incoming(v, latch)
        builder.cbranch(builder.icmp_signed("<", b1, KWv), outer, done)
        builder.position_at_end(done)
        for r in range(RT):
            p = builder.bitcast(builder.gep(A.data, [builder.add(ab, builder.mul(c(r), rs))]),
                                vty.as_pointer())
            builder.store(nacc[r], p, align=al)
        return context.get_dummy_value()
    return sig, codegen


def _make_dw_tile_s(P):
    """The NHWC tile intrinsic for P pixels (the codegen unrolls over P)."""

    def _dw_tile_s(typingctx, xf, xoffs, T, wf, woffs, xbase, c0, xpix, bz, acc, abase, apix):
        """acc[abase + p*apix + l] = bz[c0 + l] + sum_t wf[woffs[t] + c0 + l]
        * xf[xoffs[t] + xbase + p*xpix + l]  for p < P pixels and l < 2 vectors of channels
        (NHWC depthwise, M == 1, any stride and dilation).

        xf:       flat input;  xoffs: (T,) int64 offset of each valid tap's input pixel
        T:        number of valid taps (>= 1);  wf: flat (KH, KW, C) filters;  woffs: (T,) offsets
        xbase:    added to every x offset (j*sw*C + c0);  c0: first channel;  xpix: sw*C
        bz:       (C,) bias (zeros when there is none)
        acc:      flat destination row;  abase: offset of (pixel j, channel c0);  apix: pixel stride
        2*P vector accumulators in registers across all taps (P = PT: 12 independent FMA
        chains, enough to hide the FMA latency; _dw_tile's 8 are not; P = 1 for single border
        pixels), the input operands straight from memory.
        Stores bias + sum without reading acc, so overlapping tiles are harmless.
        """
        sig = _nbtypes.void(xf, xoffs, T, wf, woffs, xbase, c0, xpix, bz, acc, abase, apix)

        def codegen(context, builder, signature, args):
            xty, oty = signature.args[0], signature.args[1]
            W, vty, intp, al, fma, c, vptr = _vector_ir(context, builder, xty.dtype)
            X = context.make_array(xty)(context, builder, args[0])
            XO = context.make_array(oty)(context, builder, args[1])
            Tn = args[2]
            Wf = context.make_array(signature.args[3])(context, builder, args[3])
            WO = context.make_array(oty)(context, builder, args[4])
            xbase, c0, xpix, abase, apix = args[5], args[6], args[7], args[10], args[11]
            B = context.make_array(signature.args[8])(context, builder, args[8])
            A = context.make_array(signature.args[9])(context, builder, args[9])

            pv = [(p, h) for p in range(P) for h in range(2)]
            xo_ = [builder.add(builder.mul(c(p), xpix), c(h * W)) for p, h in pv]
            ao_ = [builder.add(builder.mul(c(p), apix), c(h * W)) for p, h in pv]
            bias = [builder.load(vptr(B.data, builder.add(c0, c(h * W))), align=al)
                    for h in range(2)]
            entry = builder.basic_block
            loop = builder.append_basic_block("ds.loop")
            done = builder.append_basic_block("ds.done")
            builder.branch(loop)
            builder.position_at_end(loop)
            t = builder.phi(intp)
            t.add_incoming(c(0), entry)
            accs = []
            for k in range(2 * P):
                ph = builder.phi(vty)
                ph.add_incoming(bias[k % 2], entry)
                accs.append(ph)
            xo = builder.add(builder.load(builder.gep(XO.data, [t])), xbase)
            wo = builder.add(builder.load(builder.gep(WO.data, [t])), c0)
            wv = [builder.load(vptr(Wf.data, builder.add(wo, c(h * W))), align=al)
                  for h in range(2)]
            new = []
            for k, o in enumerate(xo_):
                xv = builder.load(vptr(X.data, builder.add(xo, o)), align=al)
                new.append(builder.call(fma, [wv[k % 2], xv, accs[k]]))
            t1 = builder.add(t, c(1))
            t.add_incoming(t1, loop)
            for ph, v in zip(accs, new):
                ph.add_incoming(v, loop)
            builder.cbranch(builder.icmp_signed("<", t1, Tn), loop, done)
            builder.position_at_end(done)
            for v, o in zip(new, ao_):
                builder.store(v, vptr(A.data, builder.add(abase, o)), align=al)
            return context.get_dummy_value()
        return sig, codegen

    return intrinsic(_dw_tile_s)


_dw_tile_s = _make_dw_tile_s(PT)
_dw_tile_s1 = _make_dw_tile_s(1)


@intrinsic
def _transpose_tile(typingctx, src, soff, sstride, dst, doff, dstride):
    """dst[doff + k*dstride + l] = src[soff + l*sstride + k] for k, l < W, one vector's lanes:
    a W x W transpose in registers (W vector loads, log2(W) rounds of W interleaving shuffles,
    W vector stores).

    src, dst: flat arrays of the same dtype;  soff, doff: first element;  sstride, dstride:
    distance between the tile's rows in each. Round r pairs rows i and i + W/2 into their low
    and high interleaves (rows 2i and 2i+1 of the next round); after log2(W) rounds row k holds
    column k.
    """
    sig = _nbtypes.void(src, soff, sstride, dst, doff, dstride)

    def codegen(context, builder, signature, args):
        sty, dty = signature.args[0], signature.args[3]
        W, vty, intp, al, fma, c, vptr = _vector_ir(context, builder, sty.dtype)
        S = context.make_array(sty)(context, builder, args[0])
        D = context.make_array(dty)(context, builder, args[3])
        soff, sstride, doff, dstride = args[1], args[2], args[4], args[5]
        rows = [builder.load(vptr(S.data, builder.add(soff, builder.mul(c(k), sstride))),
                             align=al) for k in range(W)]
        h = W // 2
        i32 = ir.IntType(32)
        lo = ir.Constant(ir.VectorType(i32, W), [v for l in range(h) for v in (l, l + W)])
        hi = ir.Constant(ir.VectorType(i32, W), [v for l in range(h, W) for v in (l, l + W)])
        r = 1
        while r < W:
            nxt = []
            for i in range(h):
                nxt.append(builder.shuffle_vector(rows[i], rows[i + h], lo))
                nxt.append(builder.shuffle_vector(rows[i], rows[i + h], hi))
            rows = nxt
            r *= 2
        for k in range(W):
            builder.store(rows[k], vptr(D.data, builder.add(doff, builder.mul(c(k), dstride))),
                          align=al)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _dot_run(typingctx, af, a0, astep, bf, b0, bstep, count, acc, c0):
    """acc[c0 + l] += sum_{k<count} af[a0 + k*astep + l] * bf[b0 + k*bstep + l] for l < 2
    vectors (a sum over a run of pixels, vectorized along channels: the NHWC weight gradient).

    af, bf:   flat operands;  a0, b0: first pixel's offsets;  astep, bstep: pixel strides
    count:    pixels in the run;  acc: flat destination, c0: its offset
    Four vector accumulators in registers (2 vectors x even and odd pixels, so two FMA chains
    per vector hide the FMA latency), summed and added to acc once at the end.
    """
    sig = _nbtypes.void(af, a0, astep, bf, b0, bstep, count, acc, c0)

    def codegen(context, builder, signature, args):
        aty, bty, cty = signature.args[0], signature.args[3], signature.args[7]
        W, vty, intp, al, fma, c, vptr = _vector_ir(context, builder, aty.dtype)
        A = context.make_array(aty)(context, builder, args[0])
        B = context.make_array(bty)(context, builder, args[3])
        Cm = context.make_array(cty)(context, builder, args[7])
        a0, astep, b0, bstep, count, c0 = args[1], args[2], args[4], args[5], args[6], args[8]
        zero = ir.Constant(vty, [ir.Constant(vty.element, 0.0)] * W)
        pairs = builder.sdiv(count, c(2))
        entry = builder.basic_block
        loop = builder.append_basic_block("dr.loop")
        done = builder.append_basic_block("dr.done")
        builder.cbranch(builder.icmp_signed(">", pairs, c(0)), loop, done)
        builder.position_at_end(loop)
        k = builder.phi(intp)
        k.add_incoming(c(0), entry)
        accs = []
        for _ in range(4):
            ph = builder.phi(vty)
            ph.add_incoming(zero, entry)
            accs.append(ph)
        new = []
        for par in range(2):
            kk = builder.add(builder.mul(k, c(2)), c(par))
            ao = builder.add(a0, builder.mul(kk, astep))
            bo = builder.add(b0, builder.mul(kk, bstep))
            for h in range(2):
                av = builder.load(vptr(A.data, builder.add(ao, c(h * W))), align=al)
                bv = builder.load(vptr(B.data, builder.add(bo, c(h * W))), align=al)
                new.append(builder.call(fma, [av, bv, accs[par * 2 + h]]))
        k1 = builder.add(k, c(1))
        k.add_incoming(k1, loop)
        for ph, v in zip(accs, new):
            ph.add_incoming(v, loop)
        builder.cbranch(builder.icmp_signed("<", k1, pairs), loop, done)
        builder.position_at_end(done)
        res = []
        for v in new:
            ph = builder.phi(vty)
            ph.add_incoming(zero, entry)
            ph.add_incoming(v, loop)
            res.append(ph)
        tot = [builder.fadd(res[h], res[2 + h]) for h in range(2)]
        # an odd count: the last pixel
        odd = builder.icmp_signed("!=", builder.mul(pairs, c(2)), count)
        with builder.if_then(odd):
            kk = builder.sub(count, c(1))
            ao = builder.add(a0, builder.mul(kk, astep))
            bo = builder.add(b0, builder.mul(kk, bstep))
            for h in range(2):
                cp = vptr(Cm.data, builder.add(c0, c(h * W)))
                av = builder.load(vptr(A.data, builder.add(ao, c(h * W))), align=al)
                bv = builder.load(vptr(B.data, builder.add(bo, c(h * W))), align=al)
                builder.store(builder.call(fma, [av, bv, builder.load(cp, align=al)]), cp,
                              align=al)
        for h in range(2):
            cp = vptr(Cm.data, builder.add(c0, c(h * W)))
            builder.store(builder.fadd(builder.load(cp, align=al), tot[h]), cp, align=al)
        return context.get_dummy_value()
    return sig, codegen
