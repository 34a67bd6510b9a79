"""The Triton kernels as the GPU would run them, checked without a GPU (perf/static_check.py, in
a process of its own: the test session runs Triton's interpreter): the CI subset of variants
compiles for sm_90 with no spill, wgmma for every tensor-core dot and both operands of every
dot loaded by pipelined 16-byte cp.async; and the check itself catches a spilling variant and
one without wgmma."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton not installed")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "perf.static_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_ci_subset_has_no_problem(tmp_path):
    proc = _run("--ci", "--out", str(tmp_path / "ci"))
    report = json.load(open(tmp_path / "ci.json"))
    s = report["summary"]
    bad = [(r["kernel"], r["pass_"], r["dtype"], r["layout"], r["config"], r["problems"])
           for r in report["rows"] if r["problems"]]
    assert proc.returncode == 0 and not bad, (bad, proc.stdout[-2000:], proc.stderr[-2000:])
    assert s["variants"] >= 40 and s["tensor_core_variants_sm90"] >= 20, s


def test_the_check_catches_spills_and_missing_wgmma():
    proc = _run("--selftest")
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert "selftest ok" in proc.stdout
