"""The paper experiments run end to end on tiny settings (their numbers come from perf/), and the
implementations they compare agree."""
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None
                                or importlib.util.find_spec("matplotlib") is None,
                                reason="needs scikit-learn and matplotlib (pip install -e .[test])")


@pytest.fixture(autouse=True)
def _results_to_tmp(tmp_path, monkeypatch):
    from perf import paper
    monkeypatch.setattr(paper, "RESULTS", str(tmp_path))


def test_digits_losses_match():
    from perf import paper
    res = paper.run_digits(epochs=1, batch=128, width=8)
    ours, native, zi = (res[k]["losses"] for k in ("ours", "native", "zero_insertion"))
    assert len(ours) == len(native) == len(zi) > 3
    assert max(abs(a - b) for a, b in zip(ours, native)) < 1e-3
    assert max(abs(a - b) for a, b in zip(ours, zi)) < 1e-3


def test_upsample_outputs_match():
    from perf import paper
    res = paper.run_upsample(batches=1, crop=16, steps=2)
    assert res["ours"]["max_abs_diff_vs_native"] < 1e-4
    assert res["zero_insertion"]["max_abs_diff_vs_native"] < 1e-4


def test_dcgan_convert_matches_stock():
    from perf import paper
    _, dg, dd = paper.run_dcgan(steps=2, batch=4)
    assert dg < 1e-3 and dd < 1e-3


def test_idx_reader(tmp_path):
    import struct
    from perf import paper
    data = bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 3, 4) + bytes(range(24))
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(data)
    t = paper._read_idx(str(p))
    assert t.shape == (2, 3, 4) and t.flatten().tolist() == list(range(24))
