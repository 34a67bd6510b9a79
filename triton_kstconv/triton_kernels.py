"""The Triton kernels: the weight packing kernel, one segregated implicit-GEMM kernel for
forward and grad_input, the grad_weight kernel and the fixed-order sum of its split reduction.
Launch logic, tables and tuning live in triton_engine.py.

They read a per-phase table (built once per geometry and device, see
``triton_engine.phase_table``), one row of PHASE_FIELDS int32 per phase:

    per axis a in (d, h, w): Q_a (outputs), T_a (taps), OFF_a (source offset of the first tap),
    R_a (destination residue); WOFF (offset of the phase's packed weight block within a group,
    in units of C_src_g, so that the kernels can prove its alignment); per axis J0_a (kernel
    index of the phase's first tap; tap t is kernel index J0_a + t * JS_a)

A phase's reduction length is KP = T_d * T_h * T_w * C_src_g, computed in the kernels (a value
read from the table would hide its divisibility from the compiler).

A phase writes destination positions  s_a * q + R_a  and reads, for tap t, source positions
a_a * q + OFF_a + t * STEP_a.  Forward: a = 1, s = stride, STEP = -d / gcd(s, d) (taps ascend,
inputs descend).  grad_input: a = stride, s = 1, one phase with every tap, STEP = dilation.
Invalid source positions are masked (zeros never reach memory, only the padded border of a
tile multiplies them), tiles of a phase that has no taps write the bias only.
"""
import triton
import triton.language as tl

# Activation codes: keep in sync with epilogue.CODES.
ACT_NONE, ACT_RELU, ACT_LEAKY, ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_TANH, ACT_SIGMOID = range(8)
PHASE_FIELDS = tl.constexpr(16)  # Qd Qh Qw Td Th Tw OFFd OFFh OFFw Rd Rh Rw WOFF J0d J0h J0w


@triton.jit
def _tanh(v):
    return 1.0 - 2.0 / (tl.exp(2.0 * v) + 1.0)


@triton.jit
def _activation(v, slope, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.maximum(v, 0.0)
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
    return v


@triton.jit
def _phase_pixels(offs, Qd, Qh, Qw):
    """Flat pixel indices of a phase, (n, qd, qh, qw) with qw fastest; n as int64."""
    qw = offs % Qw
    t = offs // Qw
    qh = t % Qh
    t = t // Qh
    return (t // Qd).to(tl.int64), t % Qd, qh, qw


@triton.jit
def _phase_row(PH, phase):
    """One phase's row of the phase table (see PHASE_FIELDS), WOFF in units of C_src_g."""
    ph = PH + phase * PHASE_FIELDS
    return (tl.load(ph + 0), tl.load(ph + 1), tl.load(ph + 2),        # Qd Qh Qw
            tl.load(ph + 3), tl.load(ph + 4), tl.load(ph + 5),        # Td Th Tw
            tl.load(ph + 6), tl.load(ph + 7), tl.load(ph + 8),        # OFFd OFFh OFFw
            tl.load(ph + 9), tl.load(ph + 10), tl.load(ph + 11),      # Rd Rh Rw
            tl.load(ph + 12).to(tl.int64))                            # WOFF


@triton.jit
def _phase_first_taps(PH, phase):
    """J0d J0h J0w: the kernel index of a phase's first tap on each axis."""
    ph = PH + phase * PHASE_FIELDS
    return tl.load(ph + 13), tl.load(ph + 14), tl.load(ph + 15)


@triton.jit
def conv_phase_kernel(
    X, W, B, Y, PRE, PH,
    N, C_src_g, C_dst_g,
    L_d, L_h, L_w,                 # source extent per axis
    A_d, A_h, A_w,                 # source stride per axis (1 forward, s for grad_input)
    S_d, S_h, S_w,                 # destination stride per axis (s forward, 1 grad_input)
    STEP_d, STEP_h, STEP_w,        # source offset step per tap
    sxn, sxc, sxd, sxh, sxw,       # source strides (elements, any layout)
    syn, syc, syd, syh, syw,       # destination strides
    spn, spc, spd, sph, spw,       # pre-activation strides
    w_group_stride, slope,
    M_MAX,                         # pixels of the largest phase (grid extent)
    key_cin, key_cout, key_taps, key_layout,   # autotune buckets (unused in the body)
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PRE: tl.constexpr,
    ACC_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One [BLOCK_M destination pixels of a phase x BLOCK_N destination channels] tile:
    acc = sum over (tap, c_src) of x[pixel + offset(tap), c_src] * Wp[c_dst, (tap, c_src)]."""
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    g = tl.program_id(2)
    # grouped tile order: GROUP_M row tiles share each weight column tile while it is in L2
    num_m_tiles = tl.cdiv(M_MAX, BLOCK_M)
    num_n = tl.cdiv(C_dst_g, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m

    Qd, Qh, Qw, Td, Th, Tw, OFFd, OFFh, OFFw, Rd, Rh, Rw, WOFF = _phase_row(PH, phase)
    M = N * Qd * Qh * Qw
    if pid_m * BLOCK_M >= M:
        return
    KP = Td * Th * Tw * C_src_g                               # the phase's reduction length

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)          # [BLOCK_M] pixels of the phase
    mask_m = offs_m < M
    n, qd, qh, qw = _phase_pixels(offs_m, Qd, Qh, Qw)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # [BLOCK_N] destination channels
    mask_n = offs_n < C_dst_g
    arange_k = tl.arange(0, BLOCK_K)

    x_row = X + n * sxn + (g * C_src_g).to(tl.int64) * sxc    # [BLOCK_M] pointers
    w_tile = W + g.to(tl.int64) * w_group_stride + WOFF * C_src_g \
        + offs_n.to(tl.int64)[None, :] * KP
    if ACC_FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    n_k = tl.cdiv(C_src_g, BLOCK_K)
    for it in range(0, Td * Th * Tw * n_k):                   # (tap, channel block), flattened
        tap = it // n_k
        c0 = (it % n_k) * BLOCK_K
        tw = tap % Tw
        th = (tap // Tw) % Th
        td = tap // (Tw * Th)
        sd = A_d * qd + OFFd + td * STEP_d
        sh = A_h * qh + OFFh + th * STEP_h
        sw = A_w * qw + OFFw + tw * STEP_w
        valid = mask_m & (sd >= 0) & (sd < L_d) & (sh >= 0) & (sh < L_h) & (sw >= 0) & (sw < L_w)
        src = x_row + sd.to(tl.int64) * sxd + sh.to(tl.int64) * sxh + sw.to(tl.int64) * sxw
        offs_k = c0 + arange_k
        mask_k = offs_k < C_src_g
        a = tl.load(src[:, None] + offs_k.to(tl.int64)[None, :] * sxc,
                    mask=valid[:, None] & mask_k[None, :], other=0.0)      # [BLOCK_M, BLOCK_K]
        b = tl.load(w_tile + (tap * C_src_g + offs_k)[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)     # [BLOCK_K, BLOCK_N]
        if UPCAST:  # the interpreter's bf16 dot is wrong: compute it in f32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ACC_FP64:
            acc += tl.dot(a, b, out_dtype=tl.float64)
        else:
            acc += tl.dot(a, b, input_precision=PRECISION)

    # epilogue: bias, activation, one cast, a strided store into any layout
    if HAS_BIAS:
        bias = tl.load(B + g * C_dst_g + offs_n, mask=mask_n, other=0.0)
        acc += bias.to(acc.dtype)[None, :]
    od = (S_d * qd + Rd).to(tl.int64)
    oh = (S_h * qh + Rh).to(tl.int64)
    ow = (S_w * qw + Rw).to(tl.int64)
    c_out = (g * C_dst_g + offs_n).to(tl.int64)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_PRE:
        p_ptr = PRE + (n * spn + od * spd + oh * sph + ow * spw)[:, None] + c_out[None, :] * spc
        tl.store(p_ptr, acc.to(PRE.dtype.element_ty), mask=mask)
    out = _activation(acc, slope, ACT)
    y_ptr = Y + (n * syn + od * syd + oh * syh + ow * syw)[:, None] + c_out[None, :] * syc
    tl.store(y_ptr, out.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def wgrad_phase_kernel(
    X, DY, OUT, PH,
    N, C_in_g, C_out_g,
    L_d, L_h, L_w,
    S_d, S_h, S_w,
    STEP_d, STEP_h, STEP_w,
    JS_d, JS_h, JS_w,              # kernel-index step between a phase's taps, per axis
    sxn, sxc, sxd, sxh, sxw,
    syn, syc, syd, syh, syw,
    so_split, so0, so1, so2, so3, so4,   # OUT: split stride, then dW's own strides
    num_splits, pixels_per_split,
    key_cin, key_cout, key_taps, key_layout,
    ACC_FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_weight of one phase: a [BLOCK_M c_out x BLOCK_N (tap, c_in)] tile of
    dW_phase = dY_phase[c_out, pixels] x patches[pixels, (tap, c_in)], reduced over one split
    of the phase's pixels and stored straight into dW's own layout [C_in, C_out/g, *k] (each
    (c_in, c_out, tap) belongs to exactly one phase). With several splits OUT is a workspace
    [splits, *dW.shape] that sum_splits_kernel adds up in a fixed order: deterministic, no
    atomics. A phase with no outputs stores zeros, so every element is written."""
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    gs = tl.program_id(2)
    g = gs // num_splits
    split = gs % num_splits
    Qd, Qh, Qw, Td, Th, Tw, OFFd, OFFh, OFFw, Rd, Rh, Rw, WOFF = _phase_row(PH, phase)
    J0d, J0h, J0w = _phase_first_taps(PH, phase)
    KP = Td * Th * Tw * C_in_g
    num_n = tl.cdiv(KP, BLOCK_N)
    pid_m = pid // tl.maximum(num_n, 1)
    pid_n = pid % tl.maximum(num_n, 1)
    if (pid_n * BLOCK_N >= KP) | (pid_m * BLOCK_M >= C_out_g):
        return
    M = N * Qd * Qh * Qw
    m_begin = split * pixels_per_split
    m_end = tl.minimum(M, m_begin + pixels_per_split)

    offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)          # [BLOCK_M] output channels
    mask_co = offs_co < C_out_g
    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)           # [BLOCK_N] (tap, c_in) columns
    mask_k = offs_k < KP
    ci = offs_k % C_in_g
    tap = offs_k // C_in_g
    tw = tap % Tw
    th = (tap // Tw) % Th
    td = tap // (Tw * Th)
    if ACC_FP64:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    arange_p = tl.arange(0, BLOCK_K)
    dy_ch = DY + (g * C_out_g + offs_co).to(tl.int64) * syc          # [BLOCK_M]
    x_ch = X + (g * C_in_g + ci).to(tl.int64) * sxc                  # [BLOCK_N]
    for m0 in range(m_begin, m_end, BLOCK_K):
        offs_p = m0 + arange_p                                       # [BLOCK_K] pixels
        mask_p = offs_p < m_end
        n, qd, qh, qw = _phase_pixels(offs_p, Qd, Qh, Qw)
        dst = n * syn + (S_d * qd + Rd).to(tl.int64) * syd + (S_h * qh + Rh).to(tl.int64) * syh \
            + (S_w * qw + Rw).to(tl.int64) * syw
        a = tl.load(dy_ch[:, None] + dst[None, :],
                    mask=mask_co[:, None] & mask_p[None, :], other=0.0)   # [BLOCK_M, BLOCK_K]
        sd = qd[:, None] + OFFd + td[None, :] * STEP_d
        sh = qh[:, None] + OFFh + th[None, :] * STEP_h
        sw = qw[:, None] + OFFw + tw[None, :] * STEP_w
        valid = mask_p[:, None] & mask_k[None, :] & (sd >= 0) & (sd < L_d) & (sh >= 0) \
            & (sh < L_h) & (sw >= 0) & (sw < L_w)
        src = (n * sxn)[:, None] + sd.to(tl.int64) * sxd + sh.to(tl.int64) * sxh \
            + sw.to(tl.int64) * sxw
        b = tl.load(x_ch[None, :] + src, mask=valid, other=0.0)        # [BLOCK_K, BLOCK_N]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ACC_FP64:
            acc += tl.dot(a, b, out_dtype=tl.float64)
        else:
            acc += tl.dot(a, b, input_precision=PRECISION)
    # (c_in, tap) column -> dW[g * C_in_g + ci, co, J0 + t * JS]
    col = (g * C_in_g + ci).to(tl.int64) * so0 + (J0d + td * JS_d).to(tl.int64) * so2 \
        + (J0h + th * JS_h).to(tl.int64) * so3 + (J0w + tw * JS_w).to(tl.int64) * so4
    ptr = OUT + split.to(tl.int64) * so_split + offs_co.to(tl.int64)[:, None] * so1 + col[None, :]
    tl.store(ptr, acc.to(OUT.dtype.element_ty), mask=mask_co[:, None] & mask_k[None, :])


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


@triton.jit
def pack_weight_kernel(
    W, FWD, DGRAD, PH, NUMEL, C_in_g, C_out_g,
    K_d, K_h, K_w, S_d, S_h, S_w, D_d, D_h, D_w, P_d, P_h, P_w, JS_d, JS_h, JS_w,
    sw0, sw1, sw2, sw3, sw4,
    PACK_FWD: tl.constexpr, PACK_DGRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """Both packed layouts of a ConvTranspose weight W[C_in, C_out/g, kd, kh, kw] in one pass
    (each element read once, in W's own order, any strides):

    * FWD (forward): per group, per phase (row-major residues), per output channel, the phase's
      taps (td, th, tw) x C_in/g, the reduction contiguous. Tap j of an axis belongs to the
      phase of residue r = (j * dil - pad) mod s, as its (j // JS)-th tap.
    * DGRAD (grad_input): [C_in, taps (row-major), C_out/g], the adjoint's one phase.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # [BLOCK] elements of W
    mask = offs < NUMEL
    kw = offs % K_w
    t = offs // K_w
    kh = t % K_h
    t = t // K_h
    kd = t % K_d
    t = t // K_d
    co = t % C_out_g
    ci_all = t // C_out_g
    v = tl.load(W + ci_all * sw0 + co * sw1 + kd * sw2 + kh * sw3 + kw * sw4, mask=mask)
    taps = K_d * K_h * K_w
    if PACK_DGRAD:
        tl.store(DGRAD + (ci_all * taps + (kd * K_h + kh) * K_w + kw) * C_out_g + co, v,
                 mask=mask)
    if PACK_FWD:
        g = ci_all // C_in_g
        ci = ci_all % C_in_g
        rd = ((kd * D_d - P_d) % S_d + S_d) % S_d
        rh = ((kh * D_h - P_h) % S_h + S_h) % S_h
        rw = ((kw * D_w - P_w) % S_w + S_w) % S_w
        row = PH + ((rd * S_h + rh) * S_w + rw) * PHASE_FIELDS
        Th = tl.load(row + 4, mask=mask, other=1)
        Tw = tl.load(row + 5, mask=mask, other=1)
        kp = tl.load(row + 3, mask=mask, other=1) * Th * Tw * C_in_g
        woff = tl.load(row + 12, mask=mask, other=0).to(tl.int64) * C_in_g
        tap = ((kd // JS_d) * Th + kh // JS_h) * Tw + kw // JS_w
        tl.store(FWD + g * C_out_g * taps * C_in_g + woff + co * kp + tap * C_in_g + ci, v,
                 mask=mask)
