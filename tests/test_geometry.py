"""The phase maths: output sizes, tap sets, offsets, validity classes, weight segregation."""
import itertools

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from triton_kstconv import geometry as G


@given(L=st.integers(1, 12), k=st.integers(1, 7), s=st.integers(1, 5), p=st.integers(0, 4),
       d=st.integers(1, 3), data=st.data())
@settings(max_examples=300, deadline=None)
def test_axis_phases_cover_every_input_tap_pair(L, k, s, p, d, data):
    op = data.draw(st.integers(0, max(s, d) - 1))
    L_out = G.conv_transpose_output_length(L, k, s, p, d, op)
    assume(L_out > 0)
    phases = G.axis_phases(L, k, s, p, d, L_out)
    assert len(phases) == s
    # every tap belongs to exactly one phase
    assert sorted(j for ph in phases for j in ph.taps) == list(range(k))
    # sum over phases of Q is the output length
    assert sum(ph.num_out for ph in phases) == L_out
    # the (output, tap) pairs a phase computes are exactly the real (input, tap) pairs
    pairs = set()
    for ph in phases:
        for q, valid in enumerate(G.valid_taps_per_q(ph, L)):
            for t in valid:
                i = q + ph.offsets[t]
                o = q * s + ph.residue
                assert o == i * s - p + ph.taps[t] * d
                pairs.add((i, ph.taps[t]))
    expect = {(i, j) for i in range(L) for j in range(k) if 0 <= i * s - p + j * d < L_out}
    assert pairs == expect


@given(L=st.integers(1, 10), k=st.integers(1, 6), s=st.integers(1, 4), p=st.integers(0, 3),
       d=st.integers(1, 3))
@settings(max_examples=200, deadline=None)
def test_validity_classes_partition_q(L, k, s, p, d):
    L_out = G.conv_transpose_output_length(L, k, s, p, d, 0)
    assume(L_out > 0)
    for ph in G.axis_phases(L, k, s, p, d, L_out):
        cls = G.validity_classes(ph, L)
        qs = [q for c in cls for q in range(c[0], c[1])]
        assert qs == list(range(ph.num_out))
        per_q = G.valid_taps_per_q(ph, L)
        for q0, q1, t0, t1 in cls:
            for q in range(q0, q1):
                assert (per_q[q].start, per_q[q].stop) == (t0, t1) or (len(per_q[q]) == 0 == t1 - t0)


def test_known_phases_k4_s2_p1():
    # DCGAN: each output parity meets two taps
    ph = G.axis_phases(4, 4, 2, 1, 1, 8)
    assert [p.taps for p in ph] == [(1, 3), (0, 2)]
    assert [p.offsets for p in ph] == [(0, -1), (1, 0)]


def test_phase_without_taps():
    ph = G.axis_phases(4, 3, 2, 0, 2, 9)   # gcd(stride, dilation) = 2
    assert ph[1].taps == () and ph[1].num_out == 4


def test_output_size_and_output_size_argument():
    assert G.conv_transpose_output_length(5, 3, 2, 1, 1, 1) == 10
    assert G.output_padding_for_size([10, 9], [5, 5], [3, 3], [2, 2], [1, 1], [1, 1]) == (1, 0)
    assert G.output_padding_for_size([1, 2, 10, 9], [5, 5], [3, 3], [2, 2], [1, 1], [1, 1]) \
        == (1, 0)
    with pytest.raises(ValueError, match="valid sizes range from \\[9, 9\\] to \\[10, 10\\]"):
        G.output_padding_for_size([11, 9], [5, 5], [3, 3], [2, 2], [1, 1], [1, 1])


def test_normalize_params():
    p = G.normalize_params(2, stride=2, padding=(1, 0), output_padding=[1, 0], groups=1,
                           dilation=(1,))
    assert p.stride == (2, 2) and p.padding == (1, 0) and p.dilation == (1, 1)


@pytest.mark.parametrize("groups", [1, 2])
def test_segregate_weight_is_a_partition(groups):
    params = G.normalize_params(2, (2, 3), (1, 0), (1, 2), groups, (1, 2))
    geom = G.make_geometry(params, (4, 5), (4, 5))
    w = torch.randn(4, 3, 4, 5)
    packed = G.segregate_weight(w, geom)
    assert len(packed) == 6
    seen = torch.zeros(4, 5, dtype=torch.int64)
    for phase, sub in zip(geom.phases(), packed):
        assert sub.shape == (groups, 3, *[len(a.taps) for a in phase.axes], 4 // groups)
        for (a, jh), (b, jw) in itertools.product(enumerate(phase.axes[0].taps),
                                                  enumerate(phase.axes[1].taps)):
            seen[jh, jw] += 1
            ref = w[:, :, jh, jw].reshape(groups, 4 // groups, 3).transpose(1, 2)
            assert torch.equal(sub[:, :, a, b], ref)
    assert torch.all(seen == 1)


def test_useful_macs_counts_only_real_products():
    params = G.normalize_params(1, 2, 1, 0, 1, 1)
    geom = G.make_geometry(params, (4,), (4,))
    # 4 inputs x 4 taps = 16 pairs, minus those that land outside [0, 8): i=0,j=0 and i=3,j=3
    assert G.useful_macs(geom, 1, 1, 1) == 14
