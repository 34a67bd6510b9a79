"""Shared test setup: NaN-poisoned outputs, the Triton interpreter on machines without a GPU,
per-dtype tolerances, float64 references and case generators."""
import math
import os

# Before torch/triton are imported: engines fill fresh outputs with NaN (an unwritten element
# fails), and without a GPU the Triton kernels run in Triton's interpreter on CPU tensors.
os.environ["KSTCONV_POISON"] = "1"
if os.environ.get("KSTCONV_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _cpu_quota() -> int:
    """The cores this process may really use: the affinity mask, capped by a cgroup CPU quota
    (a container may see the host's cores but be allowed two; OpenMP teams sized to the host
    would then oversubscribe those two cores many times over)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n or 1)


# inherited by the processes the tests start (DDP workers, the static check)
os.environ.setdefault("OMP_NUM_THREADS", str(_cpu_quota()))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# (rtol, atol per sqrt(reduction length)): errors of a dot product grow like sqrt(K).
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-4, 2e-6),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 8e-3),
}
# TF32 on a GPU is looser.
TOL_TF32 = (3e-3, 5e-4)


def tolerance(backend: str, dtype):
    """The tolerance for an engine's result in ``dtype``. The Triton engine on a GPU computes
    float32 in TF32 exactly where PyTorch's cuDNN convolution may (one rule, the engine's own:
    triton_engine.fp32_dot_precision), and is then held to TF32's tolerance."""
    if backend == "triton" and CUDA and dtype == torch.float32:
        from triton_kstconv.triton_engine import fp32_dot_precision
        if fp32_dot_precision() == "tf32":
            return TOL_TF32
    return TOL[dtype]

NATIVE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def reduction_length(c_in, groups, kernel, stride):
    """Multiply-adds per output element (upper bound)."""
    taps = 1
    for k, s in zip(kernel, stride):
        taps *= max(1, math.ceil(k / s))
    return max(1, (c_in // groups) * taps)


def assert_close(actual, expected, dtype, k, tol=None):
    """``actual`` (any dtype) against a float64 ``expected``; NaN never passes."""
    rtol, atol = tol or TOL[dtype]
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert not torch.isnan(a).any(), "NaN in result (an element left unwritten?)"
    torch.testing.assert_close(a, e, rtol=rtol, atol=atol * math.sqrt(k) * max(1.0, e.abs().max().item() if e.numel() else 1.0))


def make_case(nd, N, c_in, c_out, groups, size, kernel, stride, padding, output_padding,
              dilation, bias, dtype, device="cpu", seed=0):
    """Fresh random data scaled so that outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, c_in, *size, generator=gen, dtype=torch.float64)
    fan = max(1, (c_in // groups) * math.prod(kernel))
    w = torch.randn(c_in, c_out // groups, *kernel, generator=gen, dtype=torch.float64) / math.sqrt(fan)
    b = torch.randn(c_out, generator=gen, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(x), cast(w), cast(b)


def reference(x, w, b, nd, **conv):
    """PyTorch's own transposed convolution in float64 on the CPU, from the same values
    (differentiable: pass leaves that require grad to get reference gradients)."""
    d = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    return NATIVE[nd](d(x), d(w), d(b), **conv)


def backends():
    import importlib.util
    out = ["cpp", "torch"]
    if importlib.util.find_spec("triton") and importlib.util.find_spec("triton_kstconv.triton_engine") \
            and (CUDA or INTERPRET):
        out.append("triton")
    return out


def device_for(backend):
    return "cuda" if (backend == "triton" and CUDA) else "cpu"


# The fast core (`pytest -m "not slow"`, a few minutes) keeps every engine's correctness on the
# CORE cases; the Triton interpreter's full matrix, compile, distributed, paper and static-check
# tests are "slow" (CI runs everything). Whole modules mark themselves; the Triton cases of the
# parametrised matrices are marked here.
SLOW_MODULES = {"test_device_work", "test_static_check", "test_autotune", "test_ddp",
                "test_paper"}


def pytest_collection_modifyitems(config, items):
    from cases import CORE
    slow = pytest.mark.slow
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        params = getattr(getattr(item, "callspec", None), "params", {})
        case = params.get("case", params.get("name"))
        if module in SLOW_MODULES or item.get_closest_marker("compile"):
            item.add_marker(slow)
        elif params.get("backend") == "triton" and str(case) not in CORE:
            item.add_marker(slow)
        elif item.get_closest_marker("cuda"):
            item.add_marker(slow)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def threads():
    """``threads(n)``: torch's thread count set for this test only (restored after it)."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@pytest.fixture
def knobs(monkeypatch):
    """``knobs(joint=1, ...)``: the library's knobs (triton_kstconv.config) changed for this
    test only."""
    import dataclasses
    from triton_kstconv import config

    def set_knobs(**changes):
        monkeypatch.setattr(config, "KNOBS", dataclasses.replace(config.KNOBS, **changes))
    return set_knobs
