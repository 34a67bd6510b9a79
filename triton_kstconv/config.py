"""The library's knobs: every ``KSTCONV_*`` environment variable it reads, read once at import
into one object, ``KNOBS``. ``override(**changes)`` changes some for the duration of a block
(the tests and the benchmarks use it). The README's "Environment" table lists each one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Knobs:
    backend: str | None = None      # KSTCONV_BACKEND: the default engine (cpp, triton, torch)
    autotune: bool = True           # KSTCONV_AUTOTUNE=0: Triton's heuristic configs, no tuning
    tuned_table: str | None = None  # KSTCONV_TUNED_TABLE: an extra Triton tuning table (JSON)
    weight_cache: bool = True       # KSTCONV_WEIGHT_CACHE=0: never reuse a packed weight
    poison: bool = False            # KSTCONV_POISON=1: fresh outputs filled with NaN (tests)
    joint: int = -1                 # KSTCONV_JOINT: C++ backward, 0 separate passes, 1 the
                                    # row-cached joint pass wherever it can run, 2 the patch
                                    # backward wherever it can run, unset: the engine's rules
    method: int = 0                 # KSTCONV_METHOD: force a C++ forward strategy (1-5, 7, 8)
    dgrad_method: int = 0           # KSTCONV_DGRAD_METHOD: ... grad_input strategy (1, 3-7)
    wgrad_method: int = 0           # KSTCONV_WGRAD_METHOD: ... grad_weight strategy (1-5)
    blas: str = "auto"              # KSTCONV_BLAS: aten (every GEMM through at::mm), mkl or
                                    # brgemm (float32 GEMMs), unset: the engine chooses
    cxxflags: tuple = ()            # KSTCONV_CXXFLAGS: extra flags for the C++ build

    @classmethod
    def from_env(cls, env=None) -> "Knobs":
        env = os.environ if env is None else env

        def integer(name, default):
            raw = env.get(name, "")
            try:
                return int(raw) if raw.strip() else default
            except ValueError:
                raise ValueError(f"{name}={raw!r}: expected an integer") from None

        blas = env.get("KSTCONV_BLAS", "auto") or "auto"
        if blas not in ("auto", "aten", "mkl", "brgemm"):
            raise ValueError(f"KSTCONV_BLAS={blas!r}: expected 'aten', 'mkl', 'brgemm' or unset")
        return cls(backend=env.get("KSTCONV_BACKEND") or None,
                   autotune=env.get("KSTCONV_AUTOTUNE", "1") != "0",
                   tuned_table=env.get("KSTCONV_TUNED_TABLE") or None,
                   weight_cache=env.get("KSTCONV_WEIGHT_CACHE", "1") != "0",
                   poison=env.get("KSTCONV_POISON", "0") == "1",
                   joint=integer("KSTCONV_JOINT", -1),
                   method=integer("KSTCONV_METHOD", 0),
                   dgrad_method=integer("KSTCONV_DGRAD_METHOD", 0),
                   wgrad_method=integer("KSTCONV_WGRAD_METHOD", 0),
                   blas=blas,
                   cxxflags=tuple(env.get("KSTCONV_CXXFLAGS", "").split()))


KNOBS = Knobs.from_env()


@contextlib.contextmanager
def override(**changes):
    """``with override(joint=1): ...``: the knobs changed inside the block only."""
    global KNOBS
    saved = KNOBS
    KNOBS = dataclasses.replace(KNOBS, **changes)
    try:
        yield KNOBS
    finally:
        KNOBS = saved


def knobs() -> Knobs:
    """The knobs in force now (``KNOBS``, or an ``override``'s)."""
    return KNOBS
