"""The autotune sweep's plumbing (in the Triton interpreter): it times configs, writes a table,
and the engine then launches the tabled config for that shape key."""
import importlib.util
import json

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed")


def test_sweep_writes_a_table_the_engine_uses(tmp_path, monkeypatch):
    from perf import autotune
    from triton_kstconv import triton_engine as te
    path = str(tmp_path / "table.json")
    out, rows = autotune.main(["--smoke", "--out", path])
    table = json.load(open(out))["configs"]
    assert {r[2] for r in rows} == {"fwd", "dgrad", "wgrad"} and len(table) == 3
    monkeypatch.setenv("KSTCONV_TUNED_TABLE", path)
    te.tuned_table.cache_clear()
    try:
        key = next(k for k in table if k.startswith("fwd|"))
        cfg = te.choose_config("fwd", 8, 4, 4, torch.float32, 4, 0, torch.device("cpu"))
        assert cfg == table[key]
        # and a call still computes the right thing with it
        import triton_kstconv as K
        x, w = torch.randn(1, 4, 3, 3), torch.randn(4, 4, 4, 4)
        torch.testing.assert_close(K.conv_transpose2d(x, w, stride=2, padding=1, backend="triton"),
                                   torch.nn.functional.conv_transpose2d(x, w, stride=2, padding=1),
                                   rtol=1e-4, atol=1e-4)
    finally:
        te.tuned_table.cache_clear()
