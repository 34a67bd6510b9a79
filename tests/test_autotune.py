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
    from triton_kstconv import config
    te.config_log.clear()
    with config.override(tuned_table=path):
        # the same layer again: every pass takes its config from the table
        import triton_kstconv as K
        x = torch.randn(1, 4, 3, 3, requires_grad=True)
        w = torch.randn(4, 4, 4, 4, requires_grad=True)
        y = K.conv_transpose2d(x, w, stride=2, padding=1, backend="triton")
        y.backward(torch.randn_like(y))
        assert {k: v[0] for k, v in te.config_log.items()} == {k: "tuned" for k in table}
        assert all(te.config_log[k][1] == table[k] for k in table)
        # and the call still computes the right thing with them
        torch.testing.assert_close(y, torch.nn.functional.conv_transpose2d(
            x, w, stride=2, padding=1), rtol=1e-4, atol=1e-4)
