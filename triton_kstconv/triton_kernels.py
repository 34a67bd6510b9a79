"""The Triton kernels. Launch logic, tables, layouts and tuning live in triton_engine.py.

* ``conv_phase_kernel``      forward and grad_input: one implicit GEMM per output phase
* ``split_epilogue_kernel``  the fixed-order sum of a split reduction, then bias, activation, cast
* ``wgrad_phase_kernel``     grad_weight, straight into dW's own layout (+ grad_bias's last sum)
* ``sum_splits_kernel``      the fixed-order sum of grad_weight's split reduction
* ``prepare_kernel``         the weight packed (forward / grad_input layouts) and a source put in
                             the kernel layout, one launch for both

Sources (the input of the forward, grad_out of grad_input) are read in the *kernel layout*:
channels-last with each group's channels padded to a multiple of 16 (zeros), every pixel stride
a multiple of 16 elements, so that Triton proves 16-byte alignment (its own specialisation of
integer arguments) and both GEMM operands load as pipelined 16-byte cp.async. Destinations are
written in whatever layout the caller allocated.

The kernels read a per-phase table (built once per geometry and device, see
``triton_engine.phase_table``), one row of PHASE_FIELDS int32 per phase:

    per axis a in (d, h, w): Q_a (outputs), T_a (taps), OFF_a (source offset of the first tap),
    R_a (destination residue); WOFF (offset of the phase's packed weight block within a group,
    in units of C_SRC); per axis J0_a (kernel index of the first tap; tap t is J0_a + t * JS_a);
    per axis TV0_a, TV1_a (the taps that meet a real source position somewhere: the others are
    never loaded, so a tile never multiplies padding alone)

A phase's reduction length is KP = T_d * T_h * T_w * C_SRC, computed in the kernels (a value
read from the table would hide its divisibility from the compiler).

A phase writes destination positions  s_a * q + R_a  and reads, for tap t, source positions
a_a * q + OFF_a + t * STEP_a.  Forward: a = 1, s = stride, STEP = -d / gcd(s, d) (taps ascend,
inputs descend).  grad_input: a = stride, s = 1, one phase with every tap, STEP = dilation.
"""
import triton
import triton.language as tl

# Activation codes: keep in sync with epilogue.CODES.
(ACT_NONE, ACT_RELU, ACT_LEAKY, ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_TANH, ACT_SIGMOID,
 ACT_RELU6) = range(9)
# Qd Qh Qw Td Th Tw OFFd OFFh OFFw Rd Rh Rw WOFF J0d J0h J0w TV0d TV0h TV0w TV1d TV1h TV1w
PHASE_FIELDS = tl.constexpr(22)


@triton.jit
def _tanh(v):
    return 1.0 - 2.0 / (tl.exp(2.0 * v) + 1.0)


@triton.jit
def _activation(v, slope, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.where(v < 0, 0.0, v)   # NaN stays NaN, as torch.relu (tl.maximum drops it)
    elif ACT == 2:
        v = tl.where(v > 0, v, v * slope)
    elif ACT == 3:
        v = v / (1.0 + tl.exp(-v))
    elif ACT == 4:
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACT == 5:
        v = 0.5 * v * (1.0 + _tanh(0.7978845608028654 * (v + 0.044715 * v * v * v)))
    elif ACT == 6:
        v = _tanh(v)
    elif ACT == 7:
        v = 1.0 / (1.0 + tl.exp(-v))
    elif ACT == 8:
        v = tl.where(v < 0, 0.0, tl.where(v > 6.0, 6.0, v))   # NaN stays NaN
    return v


@triton.jit
def _idx(v, IDX64: tl.constexpr):
    """Offsets in int64 only where the host found a tensor of 2**31 elements or more."""
    if IDX64:
        return v.to(tl.int64)
    return v


@triton.jit
def _phase_pixels(offs, Qd, Qh, Qw):
    """Flat pixel indices of a phase, (n, qd, qh, qw) with qw fastest."""
    qw = offs % Qw
    t = offs // Qw
    qh = t % Qh
    t = t // Qh
    return t // Qd, t % Qd, qh, qw


@triton.jit
def _phase_pixels_step(n, qd, qh, qw, inc_n, inc_d, inc_h, inc_w, Qd, Qh, Qw):
    """(n, qd, qh, qw) of the flat pixel indices plus a fixed step, the step given as its own
    digits (inc_w < Qw, inc_h < Qh, inc_d < Qd): a mixed-radix add with one carry a digit, so a
    loop over pixels divides once, before it (a division by a runtime size is some twenty
    instructions; the grad_weight loop did six a pixel it held, every step)."""
    qw = qw + inc_w
    carry = qw >= Qw
    qw = tl.where(carry, qw - Qw, qw)
    qh = qh + inc_h + carry.to(qh.dtype)
    carry = qh >= Qh
    qh = tl.where(carry, qh - Qh, qh)
    qd = qd + inc_d + carry.to(qd.dtype)
    carry = qd >= Qd
    qd = tl.where(carry, qd - Qd, qd)
    return n + inc_n + carry.to(n.dtype), qd, qh, qw


@triton.jit
def _phase_row(PH, phase):
    """One phase's Q, T, OFF, R (per axis) and WOFF (units of C_SRC)."""
    ph = PH + phase * PHASE_FIELDS
    return (tl.load(ph + 0), tl.load(ph + 1), tl.load(ph + 2),        # Qd Qh Qw
            tl.load(ph + 3), tl.load(ph + 4), tl.load(ph + 5),        # Td Th Tw
            tl.load(ph + 6), tl.load(ph + 7), tl.load(ph + 8),        # OFFd OFFh OFFw
            tl.load(ph + 9), tl.load(ph + 10), tl.load(ph + 11),      # Rd Rh Rw
            tl.load(ph + 12))                                         # WOFF


@triton.jit
def _phase_first_taps(PH, phase):
    """J0d J0h J0w: the kernel index of a phase's first tap on each axis."""
    ph = PH + phase * PHASE_FIELDS
    return tl.load(ph + 13), tl.load(ph + 14), tl.load(ph + 15)


@triton.jit
def _phase_window(PH, phase):
    """TV0 and TV1 per axis: the phase's taps that meet a real source position."""
    ph = PH + phase * PHASE_FIELDS
    return (tl.load(ph + 16), tl.load(ph + 17), tl.load(ph + 18),
            tl.load(ph + 19), tl.load(ph + 20), tl.load(ph + 21))


# ----------------------------------------------------------------- forward and grad_input
@triton.jit(do_not_specialize=["N", "L_d", "L_h", "L_w", "M_MAX"])
def conv_phase_kernel(
    X, W, B, Y, PRE, WS, PH,
    N, C_SRC, C_dst_g,
    L_d, L_h, L_w,                 # source extent per axis
    A_d, A_h, A_w,                 # source stride per axis (1 forward, s for grad_input)
    S_d, S_h, S_w,                 # destination stride per axis (s forward, 1 grad_input)
    STEP_d, STEP_h, STEP_w,        # source offset step per tap
    sxn, sxd, sxh, sxw,            # source strides (kernel layout: channels contiguous)
    syn, syc, syd, syh, syw,       # destination strides (any layout)
    spn, spc, spd, sph, spw,       # pre-activation strides
    swn, swd, swh, sww,            # split workspace strides (split stride: ws_split)
    ws_split, taps_total, slope, M_MAX, n_phases, c_per_split,
    key_cin, key_cout, key_taps, key_m, key_layout,   # autotune buckets (unused in the body)
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PRE: tl.constexpr,
    ACC_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,           # write fp32 partial sums to WS (split_epilogue_kernel ends)
    PIXEL_MAJOR_OUT: tl.constexpr,  # a destination whose pixels are closer than its channels
    IDX64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M destination pixels of a phase x BLOCK_N destination channels] tile:
    acc = sum over (valid tap, c_src) of x[pixel + offset(tap), c_src] * Wp[c_dst, (tap, c_src)],
    over the source channels [split * c_per_split, (split + 1) * c_per_split) of program_id(1)
    (c_per_split a multiple of 64, so that the split does not depend on the tile)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    # the phase varies fastest: all phases of a pixel block run together, so the source block
    # comes from L2 once for all of them; GROUP_M row tiles then share each weight column tile
    phase = pid % n_phases
    tile = pid // n_phases
    num_m = tl.cdiv(M_MAX, BLOCK_M)
    num_n = tl.cdiv(C_dst_g, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (tile // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % size_m
    pid_n = (tile % in_group) // size_m

    Qd, Qh, Qw, Td, Th, Tw, OFFd, OFFh, OFFw, Rd, Rh, Rw, WOFF = _phase_row(PH, phase)
    V0d, V0h, V0w, V1d, V1h, V1w = _phase_window(PH, phase)
    M = N * Qd * Qh * Qw
    if pid_m * BLOCK_M >= M:
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)          # [BLOCK_M] pixels of the phase
    mask_m = offs_m < M
    n, qd, qh, qw = _phase_pixels(offs_m, Qd, Qh, Qw)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # [BLOCK_N] destination channels
    mask_n = offs_n < C_dst_g
    offs_k = tl.arange(0, BLOCK_K)

    x_img = X + _idx(n, IDX64) * sxn + g * C_SRC              # [BLOCK_M] pointers
    KP = Td * Th * Tw * C_SRC                                 # the phase's reduction length
    w_rows = W + _idx(g, IDX64) * (C_dst_g * taps_total * C_SRC) + _idx(WOFF, IDX64) * C_SRC \
        + _idx(offs_n, IDX64) * KP                            # [BLOCK_N]
    if ACC_FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    nvd = tl.maximum(V1d - V0d, 0)
    nvh = tl.maximum(V1h - V0h, 0)
    nvw = tl.maximum(V1w - V0w, 0)
    c_lo = split * c_per_split
    c_hi = tl.minimum(C_SRC, c_lo + c_per_split)
    n_k = tl.cdiv(c_hi - c_lo, BLOCK_K)
    # (valid tap, channel block) stepped with carries, channels fastest: no division a step
    c0 = c_lo
    td = V0d
    th = V0h
    tw = V0w
    for it in range(0, nvd * nvh * nvw * n_k):
        sd = A_d * qd + OFFd + td * STEP_d
        sh = A_h * qh + OFFh + th * STEP_h
        sw = A_w * qw + OFFw + tw * STEP_w
        valid = mask_m & (sd >= 0) & (sd < L_d) & (sh >= 0) & (sh < L_h) & (sw >= 0) & (sw < L_w)
        pix = _idx(sd, IDX64) * sxd + _idx(sh, IDX64) * sxh + _idx(sw, IDX64) * sxw
        mask_k = (c0 + offs_k) < c_hi
        a = tl.load((x_img + pix)[:, None] + (c0 + offs_k)[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)     # [BLOCK_M, BLOCK_K]
        wtap = (td * Th + th) * Tw + tw
        b = tl.load(w_rows[None, :] + (wtap * C_SRC + c0 + offs_k)[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)   # [BLOCK_K, BLOCK_N]
        if UPCAST:  # the interpreter's bf16 dot is wrong: compute it in f32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ACC_FP64:
            acc += tl.dot(a, b, out_dtype=tl.float64)
        else:
            acc += tl.dot(a, b, input_precision=PRECISION)
        c0 += BLOCK_K
        wrap = (c0 >= c_hi).to(tl.int32)
        c0 -= wrap * (c0 - c_lo)
        tw += wrap
        wrap = wrap * (tw >= V1w).to(tl.int32)
        tw -= wrap * nvw
        th += wrap
        wrap = wrap * (th >= V1h).to(tl.int32)
        th -= wrap * nvh
        td += wrap

    od = S_d * qd + Rd
    oh = S_h * qh + Rh
    ow = S_w * qw + Rw
    c_out = g * C_dst_g + offs_n
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:   # partial sums, channels contiguous; the epilogue runs after every split
        ws = WS + _idx(split, IDX64) * ws_split + _idx(n, IDX64) * swn + _idx(od, IDX64) * swd \
            + _idx(oh, IDX64) * swh + _idx(ow, IDX64) * sww
        tl.store(ws[:, None] + c_out[None, :], acc.to(WS.dtype.element_ty), mask=mask)
        return
    # epilogue: bias, activation, one cast, a store into the destination's own layout
    if HAS_BIAS:
        bias = tl.load(B + c_out, mask=mask_n, other=0.0)
        acc += bias.to(acc.dtype)[None, :]
    pix_y = _idx(n, IDX64) * syn + _idx(od, IDX64) * syd + _idx(oh, IDX64) * syh \
        + _idx(ow, IDX64) * syw
    if HAS_PRE:
        pix_p = _idx(n, IDX64) * spn + _idx(od, IDX64) * spd + _idx(oh, IDX64) * sph \
            + _idx(ow, IDX64) * spw
        if PIXEL_MAJOR_OUT:
            tl.store(PRE + pix_p[None, :] + _idx(c_out, IDX64)[:, None] * spc,
                     tl.trans(acc).to(PRE.dtype.element_ty), mask=tl.trans(mask))
        else:
            tl.store(PRE + pix_p[:, None] + _idx(c_out, IDX64)[None, :] * spc,
                     acc.to(PRE.dtype.element_ty), mask=mask)
    out = _activation(acc, slope, ACT)
    if PIXEL_MAJOR_OUT:   # [BLOCK_N, BLOCK_M]: consecutive threads walk pixels
        tl.store(Y + pix_y[None, :] + _idx(c_out, IDX64)[:, None] * syc,
                 tl.trans(out).to(Y.dtype.element_ty), mask=tl.trans(mask))
    else:                 # [BLOCK_M, BLOCK_N]: consecutive threads walk channels
        tl.store(Y + pix_y[:, None] + _idx(c_out, IDX64)[None, :] * syc,
                 out.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def split_epilogue_kernel(
    WS, B, Y, PRE, NUMEL, C, D, H, Wd, num_splits,
    syn, syc, syd, syh, syw, spn, spc, spd, sph, spw, slope,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PRE: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Y = act(sum over splits of WS + bias): the splits added in order (deterministic). WS is
    [splits, N, D, H, W, C] contiguous; Y and PRE any layout."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    if ACC_FP64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(WS + s * NUMEL + offs, mask=mask, other=0.0).to(acc.dtype)
    c = offs % C
    t = offs // C
    w = t % Wd
    t = t // Wd
    h = t % H
    t = t // H
    d = t % D
    n = t // D
    if HAS_BIAS:
        acc += tl.load(B + c, mask=mask, other=0.0).to(acc.dtype)
    if HAS_PRE:
        tl.store(PRE + n * spn + c * spc + d * spd + h * sph + w * spw,
                 acc.to(PRE.dtype.element_ty), mask=mask)
    out = _activation(acc, slope, ACT)
    tl.store(Y + n * syn + c * syc + d * syd + h * syh + w * syw, out.to(Y.dtype.element_ty),
             mask=mask)


# -------------------------------------------------------------------------------- grad_weight
@triton.jit(do_not_specialize=["N", "L_d", "L_h", "L_w", "pixels_per_split", "n_parts"])
def wgrad_phase_kernel(
    X, DY, OUT, PH, PARTS, DB,
    N, C_SRC, C_in_g, C_DY, C_out_g,
    L_d, L_h, L_w,
    S_d, S_h, S_w,
    STEP_d, STEP_h, STEP_w,
    JS_d, JS_h, JS_w,              # kernel-index step between a phase's taps, per axis
    sxn, sxd, sxh, sxw,            # x in the kernel layout (channels contiguous, C_SRC a group)
    syn, syd, syh, syw,            # grad_out in the kernel layout (C_DY a group)
    so_split, so0, so1, so2, so3, so4,   # OUT: split stride, then dW's own strides
    num_splits, pixels_per_split, n_phases, n_parts, c_total,
    key_cin, key_cout, key_taps, key_m, key_layout,
    ACC_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    IDX64: tl.constexpr, BIAS_PARTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_weight of one phase: a [BLOCK_M (tap, c_in) x BLOCK_N c_out] tile of
    dW_phase^T = patches^T[(tap, c_in), pixels] x dY_phase[pixels, c_out], reduced over one
    split of the phase's pixels and stored straight into dW's own layout [C_in, C_out/g, *k]
    (each (c_in, c_out, tap) belongs to exactly one phase). With several splits OUT is a
    workspace [splits, *dW.shape] that sum_splits_kernel adds up in a fixed order. A phase with
    no outputs stores zeros, so every element is written. With BIAS_PARTS, the programs of the
    extra row phase == n_phases add up grad_bias from the layout pass's partial sums."""
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    gs = tl.program_id(2)
    if BIAS_PARTS:
        if phase == n_phases:   # grad_bias: the partial sums added in order (deterministic)
            if (gs == 0) & (pid * BLOCK_N < c_total):
                offs_c = pid * BLOCK_N + tl.arange(0, BLOCK_N)
                if ACC_FP64:
                    db = tl.zeros([BLOCK_N], dtype=tl.float64)
                else:
                    db = tl.zeros([BLOCK_N], dtype=tl.float32)
                for p in range(n_parts):
                    db += tl.load(PARTS + p * c_total + offs_c, mask=offs_c < c_total,
                                  other=0.0).to(db.dtype)
                tl.store(DB + offs_c, db.to(DB.dtype.element_ty), mask=offs_c < c_total)
            return
    g = gs // num_splits
    split = gs % num_splits
    Qd, Qh, Qw, Td, Th, Tw, OFFd, OFFh, OFFw, Rd, Rh, Rw, WOFF = _phase_row(PH, phase)
    J0d, J0h, J0w = _phase_first_taps(PH, phase)
    KP = Td * Th * Tw * C_SRC
    num_n = tl.cdiv(C_out_g, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    if pid_m * BLOCK_M >= KP:
        return
    M = N * Qd * Qh * Qw
    m_begin = split * pixels_per_split
    m_end = tl.minimum(M, m_begin + pixels_per_split)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)          # [BLOCK_M] (tap, c_in) rows
    mask_m = offs_m < KP
    ci = offs_m % C_SRC
    tap = offs_m // C_SRC
    tw = tap % Tw
    th = (tap // Tw) % Th
    td = tap // (Tw * Th)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # [BLOCK_N] output channels
    mask_n = offs_n < C_out_g
    if ACC_FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    arange_p = tl.arange(0, BLOCK_K)
    x_rows = X + g * C_SRC + ci                               # [BLOCK_M]
    dy_cols = DY + g * C_DY + offs_n                          # [BLOCK_N]
    mask_dy = offs_n < C_DY
    # the pixels' (n, qd, qh, qw), divided out once and stepped by BLOCK_K after (a phase
    # with no pixels runs no step: its sizes are only kept from dividing by zero)
    Qd, Qh, Qw = tl.maximum(Qd, 1), tl.maximum(Qh, 1), tl.maximum(Qw, 1)
    n, qd, qh, qw = _phase_pixels(m_begin + arange_p, Qd, Qh, Qw)   # [BLOCK_K] each
    inc_n, inc_d, inc_h, inc_w = _phase_pixels(BLOCK_K, Qd, Qh, Qw)
    # x's offset is a pixel part plus a (tap, c_in) part: one add a tile element
    od = OFFd + td * STEP_d                                   # [BLOCK_M] source offsets
    oh = OFFh + th * STEP_h
    ow = OFFw + tw * STEP_w
    x_rows += _idx(od, IDX64) * sxd + _idx(oh, IDX64) * sxh + _idx(ow, IDX64) * sxw
    for m0 in range(m_begin, m_end, BLOCK_K):
        offs_p = m0 + arange_p                                # [BLOCK_K] pixels of the phase
        mask_p = offs_p < m_end
        sd = qd[None, :] + od[:, None]                        # [BLOCK_M, BLOCK_K]
        sh = qh[None, :] + oh[:, None]
        sw = qw[None, :] + ow[:, None]
        valid = mask_m[:, None] & mask_p[None, :] & (sd >= 0) & (sd < L_d) & (sh >= 0) \
            & (sh < L_h) & (sw >= 0) & (sw < L_w)
        src = _idx(n, IDX64) * sxn + _idx(qd, IDX64) * sxd + _idx(qh, IDX64) * sxh \
            + _idx(qw, IDX64) * sxw                           # [BLOCK_K]
        a = tl.load(x_rows[:, None] + src[None, :], mask=valid, other=0.0)  # [BLOCK_M, BLOCK_K]
        dst = _idx(n, IDX64) * syn + _idx(S_d * qd + Rd, IDX64) * syd \
            + _idx(S_h * qh + Rh, IDX64) * syh + _idx(S_w * qw + Rw, IDX64) * syw
        b = tl.load(dy_cols[None, :] + dst[:, None], mask=mask_p[:, None] & mask_dy[None, :],
                    other=0.0)                                          # [BLOCK_K, BLOCK_N]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ACC_FP64:
            acc += tl.dot(a, b, out_dtype=tl.float64)
        else:
            acc += tl.dot(a, b, input_precision=PRECISION)
        n, qd, qh, qw = _phase_pixels_step(n, qd, qh, qw, inc_n, inc_d, inc_h, inc_w,
                                           Qd, Qh, Qw)
    # (tap, c_in) row -> dW[g * C_in_g + ci, co, J0 + t * JS]
    row = _idx(g * C_in_g + ci, IDX64) * so0 + _idx(J0d + td * JS_d, IDX64) * so2 \
        + _idx(J0h + th * JS_h, IDX64) * so3 + _idx(J0w + tw * JS_w, IDX64) * so4
    ptr = OUT + _idx(split, IDX64) * so_split + row[:, None] + _idx(offs_n, IDX64)[None, :] * so1
    tl.store(ptr, acc.to(OUT.dtype.element_ty),
             mask=(mask_m & (ci < C_in_g))[:, None] & mask_n[None, :])


@triton.jit
def sum_splits_kernel(WS, OUT, NUMEL, num_splits, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[i] = sum over s of WS[s, i], the splits added in order (deterministic), one cast."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    if ACC_FP64:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(WS + s * NUMEL + offs, mask=mask, other=0.0).to(acc.dtype)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


# -------------------------------------------------------------------- packing and layouts
@triton.jit
def _pack_forward(W, FWD, PH, pid, phase, g, C_in_g, C_out_g, C_SRC, taps_total,
                  sw0, sw1, sw2, sw3, sw4, JS_d, JS_h, JS_w, BLOCK: tl.constexpr):
    """A block of one phase's packed forward weight: [C_out/g, taps of the phase, C_SRC], the
    channels past C_in/g zero. Element (co, t, ci) is W[g * C_in_g + ci, co, J0 + t * JS]."""
    Qd, Qh, Qw, Td, Th, Tw, OFFd, OFFh, OFFw, Rd, Rh, Rw, WOFF = _phase_row(PH, phase)
    J0d, J0h, J0w = _phase_first_taps(PH, phase)
    kp = Td * Th * Tw * C_SRC
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C_out_g * kp
    Td = tl.maximum(Td, 1)   # a phase without taps packs nothing (mask): no division by 0
    Th = tl.maximum(Th, 1)
    Tw = tl.maximum(Tw, 1)
    ci = offs % C_SRC
    t = offs // C_SRC
    tap = t % (Td * Th * Tw)
    co = t // (Td * Th * Tw)
    tw = tap % Tw
    th = (tap // Tw) % Th
    td = tap // (Tw * Th)
    src = (g * C_in_g + ci) * sw0 + co * sw1 + (J0d + td * JS_d) * sw2 \
        + (J0h + th * JS_h) * sw3 + (J0w + tw * JS_w) * sw4
    v = tl.load(W + src, mask=mask & (ci < C_in_g), other=0.0)
    dst = g.to(tl.int64) * C_out_g * taps_total * C_SRC + WOFF.to(tl.int64) * C_SRC + offs
    tl.store(FWD + dst, v, mask=mask)


@triton.jit
def _pack_grad_input(W, DGRAD, pid, g, C_in_g, C_out_g, C_DY, K_d, K_h, K_w,
                     sw0, sw1, sw2, sw3, sw4, BLOCK: tl.constexpr):
    """A block of the grad_input weight of group g: [C_in/g, every tap, C_DY], the channels
    past C_out/g zero. Element (ci, tap, co) is W[g * C_in_g + ci, co, tap]."""
    taps = K_d * K_h * K_w
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < C_in_g * taps * C_DY
    co = offs % C_DY
    t = offs // C_DY
    tap = t % taps
    ci = t // taps
    kw = tap % K_w
    kh = (tap // K_w) % K_h
    kd = tap // (K_w * K_h)
    src = (g * C_in_g + ci) * sw0 + co * sw1 + kd * sw2 + kh * sw3 + kw * sw4
    v = tl.load(W + src, mask=mask & (co < C_out_g), other=0.0)
    tl.store(DGRAD + g.to(tl.int64) * C_in_g * taps * C_DY + offs, v, mask=mask)


@triton.jit
def _to_kernel_layout(X, Y, PARTS, pid, P, C, C_PAD, G, Dd, Hd, Wd, sxn, sxc, sxd, sxh, sxw,
                      WITH_SUMS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """A [BLOCK_P pixels x BLOCK_C channels] block of Y = X in the kernel layout: [N, D, H, W,
    G, C_PAD] with the channels past C zero; WITH_SUMS: the block's per-channel sums into
    PARTS[pixel block, G * C] (grad_bias, added up by wgrad_phase_kernel)."""
    n_cb = tl.cdiv(C_PAD, BLOCK_C)
    pid_p = pid // (G * n_cb)
    gc = pid % (G * n_cb)
    g = gc // n_cb
    offs_c = (gc % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)    # [BLOCK_C] channels of group g
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)   # [BLOCK_P] pixels
    mask_p = offs_p < P
    w = offs_p % Wd
    t = offs_p // Wd
    h = t % Hd
    t = t // Hd
    d = t % Dd
    n = t // Dd
    src = (n * sxn + d * sxd + h * sxh + w * sxw)[:, None] + ((g * C + offs_c) * sxc)[None, :]
    v = tl.load(X + src, mask=mask_p[:, None] & (offs_c < C)[None, :], other=0.0)
    tl.store(Y + (offs_p * (G * C_PAD) + g * C_PAD)[:, None] + offs_c[None, :], v,
             mask=mask_p[:, None] & (offs_c < C_PAD)[None, :])
    if WITH_SUMS:
        part = tl.sum(v.to(PARTS.dtype.element_ty), axis=0)
        tl.store(PARTS + pid_p * (G * C) + g * C + offs_c, part, mask=offs_c < C)


@triton.jit
def prepare_kernel(
    W, FWD, DGRAD, PH, X, XK, PARTS,
    C_in_g, C_out_g, C_SRC, C_DY, taps_total, K_d, K_h, K_w, JS_d, JS_h, JS_w,
    sw0, sw1, sw2, sw3, sw4, n_phases, groups, fwd_programs, dgrad_programs,
    P, C, C_PAD, G, Dd, Hd, Wd, sxn, sxc, sxd, sxh, sxw,
    PACK_FWD: tl.constexpr, PACK_DGRAD: tl.constexpr, CONVERT: tl.constexpr,
    WITH_SUMS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Everything a pass needs before its GEMM, in one launch, split by program id: the forward
    weight packed (phase by phase), the grad_input weight packed, and a source tensor put in the
    kernel layout (with grad_bias's partial sums, for grad_out)."""
    pid = tl.program_id(0)
    if PACK_FWD:
        per_group = n_phases * fwd_programs
        if pid < groups * per_group:
            g = pid // per_group
            r = pid % per_group
            _pack_forward(W, FWD, PH, r % fwd_programs, r // fwd_programs, g, C_in_g, C_out_g,
                          C_SRC, taps_total, sw0, sw1, sw2, sw3, sw4, JS_d, JS_h, JS_w, BLOCK)
            return
        pid -= groups * per_group
    if PACK_DGRAD:
        if pid < groups * dgrad_programs:
            _pack_grad_input(W, DGRAD, pid % dgrad_programs, pid // dgrad_programs, C_in_g,
                             C_out_g, C_DY, K_d, K_h, K_w, sw0, sw1, sw2, sw3, sw4, BLOCK)
            return
        pid -= groups * dgrad_programs
    if CONVERT:
        _to_kernel_layout(X, XK, PARTS, pid, P, C, C_PAD, G, Dd, Hd, Wd, sxn, sxc, sxd, sxh,
                          sxw, WITH_SUMS, BLOCK_P, BLOCK_C)
