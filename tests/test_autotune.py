"""The autotune sweep's plumbing (in the Triton interpreter): it times configs, writes a table,
and the engine then launches the tabled config for that shape key."""
import importlib.util
import json

import pytest
import torch

from conftest import device_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed")


def test_sweep_keeps_the_heuristic_when_no_config_beats_it(tmp_path, monkeypatch):
    """A config that times no faster than the heuristic one is not tabled (the first H200
    sweep took the first --max-configs of the space, which need not hold the heuristic)."""
    from perf import autotune
    from triton_kstconv import triton_config as tc
    heuristic_ms = {"fwd": 1.0, "dgrad": 0.5, "wgrad": 1.0}
    tuned_ms = {"fwd": 2.0, "dgrad": 0.7, "wgrad": 1.0}        # slower, slower, a tie
    kind = []

    def bench(fn, device):
        fn()                                   # the pass itself still runs (and is right)
        return (tuned_ms if tc._FORCED else heuristic_ms)[kind[0]]
    monkeypatch.setattr(autotune, "_bench", bench)
    layer = autotune.parse_shape("1,4,4,3,3,4,2,1,0")
    dev = device_for("triton")
    for k in heuristic_ms:
        kind[:] = [k]
        res = autotune.sweep_layer(layer, torch.float32, [k], dev, max_configs=2)
        key, cfg, best, heur = res[k]
        assert cfg is None and best == heur == heuristic_ms[k], (k, res)


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


def test_shipped_tables_hold_only_configs_of_the_space():
    """Every config in a shipped ``tuned/*.json`` is one the sweep could have chosen for its
    pass, so a table left stale by a change to the space cannot launch a config nobody tried."""
    import glob
    import os
    from triton_kstconv import triton_config as tc
    paths = sorted(glob.glob(os.path.join(tc._TUNED_DIR, "*.json")))
    assert paths, "no shipped table"
    for path in paths:
        for key, cfg in json.load(open(path))["configs"].items():
            kind = key.split("|")[0]
            space = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                     for c in tc.config_space(kind)]
            if kind == "wgrad":
                for c in space:
                    c.pop("GROUP_M", None)
            assert cfg in space, (os.path.basename(path), key, cfg)
