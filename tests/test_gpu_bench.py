"""The GPU benchmark's machinery, run on the CPU (its CUDA-only measurements, graphs and
memory, report None there): rows reach the file as they are measured, errors are checked, and
the report reads them back."""
import json

from perf import gpu_bench
from perf.layers import Layer


def test_rows_are_written_as_measured_and_reported(tmp_path):
    layer = Layer("test", "8-4@6 k4s2p1", 2, 8, 4, (6, 6), 4, 2, 1)
    path = tmp_path / "rows.jsonl"
    written = []

    def write(row):
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        written.append(row)

    for mode in gpu_bench.MODES:
        gpu_bench.measure_layer(layer, "cpu", "float32", mode,
                                ("ours", "ours_cl", "cudnn", "zero_insertion"), None, 1, write)
    assert len(written) == 8 and len(path.read_text().splitlines()) == 8
    for row in written:
        assert "error" not in row, row
        assert row["ok"] and row["err"] < 1e-5 and row["eager_ms"] > 0, row
        assert row["graph_ms"] is None and row["peak_mb"] is None   # CUDA only
        assert row["host_ms"] is None
    with open(tmp_path / "meta-float32.json", "w") as f:
        json.dump(gpu_bench.metadata("cpu"), f)
    gpu_bench.report(str(tmp_path))
    summary = json.load(open(tmp_path / "gpu.json"))["summary"]
    assert summary["float32/forward"]["eager_ms"]["layers"] == 1
    assert "| test/8-4@6 k4s2p1 |" in (tmp_path / "gpu.md").read_text()


def test_a_failing_implementation_is_recorded_not_fatal(tmp_path, monkeypatch):
    layer = Layer("test", "4-4@3 k2s2", 1, 4, 4, (3, 3), 2, 2)
    rows = []
    broken = lambda x, w, b, **kw: (_ for _ in ()).throw(RuntimeError("boom"))  # noqa: E731
    gpu_bench.measure_layer(layer, "cpu", "float32", "forward", ("cudnn", "flaggems"), broken,
                            1, rows.append)
    by = {r["impl"]: r for r in rows}
    assert "boom" in by["flaggems"]["error"] and by["cudnn"]["ok"]


def test_a_cut_off_run_lists_what_it_left(tmp_path, monkeypatch):
    """gpu_check.sh stops the bench with SIGINT at its hard limit: the layer under way and all
    after it are recorded as unmeasured, the rows before it stay."""
    calls = []

    def measure(layer, device, dname, mode, impls, fn, rounds, write):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((layer.key, dname, mode))
        write({"layer": layer.key, "dtype": dname, "mode": mode, "impl": "ours", "eager_ms": 1.0})

    monkeypatch.setattr(gpu_bench, "measure_layer", measure)
    monkeypatch.setattr(gpu_bench, "measure_peak", lambda device, dname: None)
    gpu_bench.main(["--device", "cpu", "--out", str(tmp_path), "--dtypes", "float32",
                    "bfloat16", "--layers", "dcgan/512-256", "unet/512-256"])
    meta = json.load(open(tmp_path / "meta-float32-bfloat16.json"))
    assert len(calls) == 3 and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 3
    assert meta["left_unmeasured"][0] == [calls[-1][0], "bfloat16", "forward+backward"]
    assert len(meta["left_unmeasured"]) == 8 - 3
    with open(tmp_path / "rows.jsonl", "a") as f:   # a row cut off by the kill
        f.write('{"layer": "dcgan/512-25')
    assert len(gpu_bench.load_rows(str(tmp_path))) == 3
