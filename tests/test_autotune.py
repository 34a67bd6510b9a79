"""The autotune sweep's plumbing (in the Triton interpreter): it times configs, writes a table,
and the engine then launches the tabled config for that shape key."""
import importlib.util
import json

import pytest
import torch

from conftest import device_for

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed")


@pytest.mark.parametrize("kind", ["fwd", "wgrad"])
@pytest.mark.parametrize("candidates_ms, tabled", [
    ((2.0, 2.0), None),         # both slower: the current config stays
    ((1.0, 0.98), None),        # a tie, and a win inside the 3 % margin: stays
    ((2.0, 0.5), 1),            # a clear win: the second candidate is tabled
])
def test_sweep_tables_a_config_only_where_it_beats_the_current_one(kind, candidates_ms, tabled,
                                                                    monkeypatch):
    """A config is tabled only where it times clearly faster than the one the engine takes
    now (the heuristic's here), which is timed forced, as the candidates are (the first H200
    sweep timed it through the runtime autotuner, so it compared dispatch costs)."""
    from perf import autotune
    from triton_kstconv import triton_config as tc
    times = iter((1.0,) + candidates_ms)
    seen = []

    def bench(fn, device):
        fn()                                   # the pass itself still runs (and is right)
        assert tc._FORCED, "timed outside a forced config"
        seen.append(dict(tc._FORCED[-1]))
        return next(times)
    monkeypatch.setattr(autotune, "_bench", bench)
    layer = autotune.parse_shape("1,4,4,3,3,4,2,1,0")
    tc.config_log.clear()
    res = autotune.sweep_layer(layer, torch.float32, [kind], device_for("triton"),
                               max_configs=2)
    key, cfg, best, current = res[kind]
    assert len(seen) == 3 and current == 1.0
    if tabled is None:
        assert cfg is None and best == current
    else:
        assert cfg == seen[1 + tabled] and best == candidates_ms[tabled]
    if tc.interpreting():                      # the interpreter's one config, unforced
        want = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
        assert seen[0] == (want if kind == "wgrad" else dict(want, GROUP_M=1))


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
    if not paths:
        pytest.skip("no table shipped")
    for path in paths:
        for key, cfg in json.load(open(path))["configs"].items():
            kind = key.split("|")[0]
            space = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                     for c in tc.config_space(kind)]     # wgrad's carry no GROUP_M
            assert cfg in space, (os.path.basename(path), key, cfg)
