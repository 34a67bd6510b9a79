"""perf/model_bench.py's arithmetic and its run on a tiny model (its numbers come from perf/)."""
import pytest
import torch

from conftest import CUDA


def test_speedup_is_the_median_of_per_round_ratios():
    """A machine that slows down between rounds moves both variants of a round alike: the
    ratio of the medians (20 / 22 here) reads a slowdown where every round but one saw a
    speedup; the median of the per-round ratios does not."""
    from perf import model_bench
    samples = {"stock": [10.0, 30.0, 20.0], "convert": [9.0, 27.0, 22.0]}
    ms, speedup, (q1, q3) = model_bench._paired(samples, "convert")
    assert ms == 22.0
    assert speedup == pytest.approx(10 / 9)
    ratios = [10 / 9, 10 / 9, 20 / 22]
    assert min(ratios) <= q1 < speedup <= q3 + 1e-12 <= max(ratios) + 2e-12   # not extrapolated
    assert model_bench._paired(samples, "stock")[1:] == (1.0, (1.0, 1.0))


@pytest.mark.skipif(CUDA, reason="the model benchmark runs on CPU")
def test_a_tiny_model_is_measured_with_its_noise(monkeypatch):
    from perf import model_bench
    monkeypatch.setattr(model_bench, "_time", lambda fn, rounds_ms=200.0: (fn(), 1.0)[1])

    def factory():
        return torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 3, 4, 2, 1),
                                   torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    rows, report = model_bench.measure_model("tiny", factory,
                                             lambda b: torch.randn(b, 4, 5, 5), 2, 3)
    assert [r["variant"] for r in rows] == list(model_bench.VARIANTS)
    for r in rows:
        assert r["train_speedup"] == 1.0 and r["train_speedup_quartiles"] == (1.0, 1.0)
        assert r["eval_rel_err"] < 1e-5
    md = model_bench.markdown(rows, dict(device_name="cpu", date="d", torch="t", threads=1,
                                         rounds=3))
    assert "| tiny | 2 | convert | 1.00 | 1.00 (1.00-1.00) |" in md
