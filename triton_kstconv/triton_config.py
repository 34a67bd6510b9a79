"""Configuration of the Triton kernels: float32 precision, the tile configs (a shipped tuning
table, Triton's autotuner over a small curated space, or a heuristic), their pruning per problem
and the record of which config each shape key ran with.

Order for a launch: a config forced by ``forced_config`` (the autotune sweep); a key found in
``tuned/*.json`` (written by ``perf/autotune.py``) or ``KSTCONV_TUNED_TABLE``; under
``TRITON_INTERPRET=1`` one small fixed config; else Triton's autotuner (once per key: bucketed
channels, taps, log2 of the pixels, dtype and layout; never batch or image size as such), its
choice kept in Triton's on-disk cache; ``KSTCONV_AUTOTUNE=0`` takes the heuristic instead (no
start-up latency). Every config the library can pick compiles for sm_90 without spilling, with
wgmma and both GEMM operands pipelined (``perf/static_check.py`` checks it).
"""
from __future__ import annotations

import contextlib
import functools
import glob
import inspect
import json
import os

import torch

from . import config

_TUNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")
KINDS = ("fwd", "dgrad", "wgrad")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------ precision
def cudnn_conv_tf32() -> bool:
    """Whether PyTorch lets cuDNN run float32 convolutions in TF32: ``torch.backends.cudnn.conv
    .fp32_precision`` (inherited from ``cudnn.fp32_precision``, then ``torch.backends
    .fp32_precision``, where "none"), or the legacy ``torch.backends.cudnn.allow_tf32``
    (default True) where the new flags do not exist. Read through the new flags first, because
    the legacy getter raises when a program set conv and RNN flags apart."""
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        for value in (conv.fp32_precision, getattr(cudnn, "fp32_precision", "none"),
                      getattr(torch.backends, "fp32_precision", "none")):
            if value != "none":
                return value == "tf32"
        return False
    return bool(cudnn.allow_tf32)


def fp32_dot_precision() -> str:
    """The one rule for float32 products on the GPU, used by the engine and its tests alike:
    TF32 exactly where PyTorch's own transposed convolution (cuDNN) may use it."""
    return "tf32" if cudnn_conv_tf32() else "ieee"


def precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not interpreting():
        return fp32_dot_precision()
    return "ieee"


# ------------------------------------------------------------------------------ keys
def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v - 1).bit_length())


def bucket(v: int) -> int:
    """Channel counts as autotune keys: powers of two up to 1024."""
    return min(_next_pow2(max(1, v)), 1024)


def m_bucket(m: int) -> int:
    """Pixel counts as autotune keys: log2, from 2**6 to 2**20."""
    return min(max(int(m).bit_length(), 6), 20)


def shape_key(kind: str, dtype: torch.dtype, c_src_g: int, c_dst_g: int, taps: int, m: int,
              layout: int, device_name: str = "") -> str:
    return f"{kind}|{str(dtype).replace('torch.', '')}|cin{bucket(c_src_g)}|cout" \
           f"{bucket(c_dst_g)}|taps{taps}|m{m_bucket(m)}|cl{layout}|{device_name}"


@functools.lru_cache(maxsize=16)
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@functools.lru_cache(maxsize=16)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


# ------------------------------------------------------------------------------ configs
def _wide(dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def heuristic_config(kind: str, m: int, c_src_g: int, c_dst_g: int, dtype,
                     layout: int = 1) -> dict:
    """A config from the problem's sizes alone (KSTCONV_AUTOTUNE=0). fwd / dgrad: M = pixels
    of a phase, N = destination channels, K = (tap, source channels). wgrad: M = (tap, c_in),
    N = c_out, K = pixels. ``layout`` 0: a destination whose channels are not contiguous
    (NCHW), stored pixel by pixel: at most 32 accumulators a thread (see pixel_major_fits)."""
    if interpreting():
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
        return cfg if kind == "wgrad" else dict(cfg, GROUP_M=1)
    bk = 64 if _wide(dtype) else 32
    bn = max(16, min(128, _next_pow2(c_dst_g)))
    if kind == "wgrad":
        return dict(BLOCK_M=64 if bn > 64 else 128, BLOCK_N=bn, BLOCK_K=bk, num_warps=4,
                    num_stages=3)
    bm = 128 if m >= 4096 else 64
    if layout == 0:
        bn = min(bn, 64)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                num_warps=8 if bm * bn >= 128 * 64 else 4, num_stages=3)


def pixel_major_fits(block_m: int, block_n: int, num_warps: int) -> bool:
    """Tiles whose transposed (pixel-major) store compiles without spilling on triton 3.6 and
    3.9 (perf/static_check.py): every element of such a store carries its own address."""
    per_thread = block_m * block_n // (32 * num_warps)
    return per_thread <= 16 or (num_warps == 8 and per_thread <= 32)


# The curated autotune space: (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_K is 64 for
# 2-byte types and 32 for 4-byte ones (the shared memory the stages take). Each tile compiles
# for sm_90 with wgmma, both operands pipelined and no spill (perf/static_check.py --space).
_SPACE = {
    "conv": [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4),
             (128, 32, 4, 4), (64, 32, 4, 4), (128, 16, 4, 4), (256, 64, 8, 3),
             (128, 64, 8, 3), (64, 64, 8, 3)],
    "wgrad": [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
              (128, 32, 4, 4), (128, 16, 4, 4)],
}


def config_space(kind: str):
    """The autotune space for a kind (pruned per problem by ``prune``): tiles from _SPACE, each
    with both BLOCK_K values, and for fwd / dgrad both tile orders (GROUP_M 1 and 8)."""
    import triton
    out = []
    for bm, bn, warps, stages in _SPACE["wgrad" if kind == "wgrad" else "conv"]:
        for bk in (32, 64):
            meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
            for group_m in ((1, 8) if kind != "wgrad" else (None,)):
                if group_m is not None:
                    meta = dict(meta, GROUP_M=group_m)
                out.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return out


def prune(kind):
    """Per problem: BLOCK_K by element size, no tile more than twice the problem's extent."""
    def _prune(configs, named_args, **kwargs):
        x = named_args.get("X")
        wide = getattr(x, "element_size", lambda: 2)() <= 2
        if kind == "wgrad":
            m_ext = named_args["C_SRC"] * named_args.get("key_taps", 1)
            n_ext = named_args["C_out_g"]
        else:
            m_ext, n_ext = named_args["M_MAX"], named_args["C_dst_g"]
        keep = []
        for c in configs:
            k = c.kwargs
            if k["BLOCK_K"] != (64 if wide else 32):
                continue
            if k["BLOCK_N"] > 2 * max(16, _next_pow2(n_ext)) or \
                    k["BLOCK_M"] > 2 * max(64, _next_pow2(m_ext)):
                continue
            if k.get("GROUP_M") == 1 and n_ext <= k["BLOCK_N"]:
                continue   # one column of tiles: the tile order makes no difference
            if kind != "wgrad" and named_args.get("key_layout", 1) == 0 and \
                    not pixel_major_fits(k["BLOCK_M"], k["BLOCK_N"], c.num_warps):
                continue
            keep.append(c)
        return keep or configs[:1]
    return _prune


@functools.lru_cache(maxsize=None)
def tuned_kernel(kind: str):
    """The kind's kernel wrapped in Triton's autotuner (its space, pruned per problem)."""
    import triton
    from . import triton_kernels as tk
    base = tk.conv_phase_kernel if kind != "wgrad" else tk.wgrad_phase_kernel
    kwargs = {}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kwargs["cache_results"] = True   # Triton's on-disk autotune cache
    return triton.autotune(config_space(kind),
                           key=["key_cin", "key_cout", "key_taps", "key_m", "key_layout"],
                           prune_configs_by={"early_config_prune": prune(kind)},
                           **kwargs)(base)


def autotune_enabled() -> bool:
    return config.knobs().autotune and not interpreting()


def tuned_table() -> dict:
    """Configs chosen by perf/autotune.py for known shape keys (skips tuning at run time):
    every ``tuned/*.json`` shipped with the package, then ``KSTCONV_TUNED_TABLE`` if set."""
    return _load_tables(config.knobs().tuned_table)


_TABLES_READ = [0]   # bumped by reload_tuned_tables (part of state())


def reload_tuned_tables():
    """Forget the tables read so far (after writing one)."""
    _load_tables.cache_clear()
    _TABLES_READ[0] += 1


@functools.lru_cache(maxsize=4)
def _load_tables(extra) -> dict:
    paths = sorted(glob.glob(os.path.join(_TUNED_DIR, "*.json")))
    if extra:
        paths.append(extra)
    table = {}
    for path in paths:
        with open(path) as f:
            table.update(json.load(f).get("configs", {}))
    return table


_FORCED: list = []   # configs forced by forced_config() (the autotune sweep)


@contextlib.contextmanager
def forced_config(cfg: dict):
    """Run every launch inside the block with ``cfg`` (used by perf/autotune.py)."""
    _FORCED.append(cfg)
    try:
        yield
    finally:
        _FORCED.pop()


# shape key -> where its config came from ("forced", "tuned", "interpreter", "autotune",
# "heuristic") and the config (for "autotune": the one Triton's autotuner picked, once known)
config_log: dict = {}


def state(dtype) -> tuple:
    """Everything besides the problem's sizes that a launch's config and constants depend on:
    the knobs, a forced config, the tables read, the interpreter and the float32 precision
    (PyTorch's TF32 flags, which a program may change between calls). Launch plans
    (triton_engine) are kept under it."""
    forced = tuple(sorted(_FORCED[-1].items())) if _FORCED else None
    return (config.knobs(), forced, _TABLES_READ[0], interpreting(), precision(dtype))


def log_choice(key: str, source: str, cfg):
    """Record in config_log where a launch's config came from (``choose``'s answer)."""
    if config_log.get(key, (None,))[0] != source:
        config_log[key] = (source, cfg)


def choose(kind: str, m: int, c_src_g: int, c_dst_g: int, dtype, taps: int, layout: int,
           device: torch.device):
    """(shape key, where the config comes from, the config dict or None to autotune), in the
    order the module docstring gives."""
    key = shape_key(kind, dtype, c_src_g, c_dst_g, taps, m, layout, device_name(device))
    if _FORCED:
        source, cfg = "forced", _FORCED[-1]
    elif key in tuned_table():
        source, cfg = "tuned", tuned_table()[key]
    elif interpreting():
        source, cfg = "interpreter", heuristic_config(kind, m, c_src_g, c_dst_g, dtype, layout)
    elif autotune_enabled():
        source, cfg = "autotune", None
    else:
        source, cfg = "heuristic", heuristic_config(kind, m, c_src_g, c_dst_g, dtype, layout)
    return key, source, cfg


def autotuned_config(kernel):
    """The config Triton's autotuner ``kernel`` chose in its last run, as a dict (None if it
    has not run)."""
    best = getattr(kernel, "best_config", None)
    if best is None:
        return None
    return dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)


def split_launch_options(cfg: dict):
    cfg = dict(cfg)
    launch_opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    return cfg, launch_opts
