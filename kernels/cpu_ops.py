"""Builds and loads the C++ CPU kernels once per machine (cached); None when no compiler is usable."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

_SOURCES = [
    Path(__file__).parent / "cpu" / name
    for name in ("paged_attention.cpp", "elementwise.cpp", "gemm.cpp", "prefill_attention.cpp")
]
# -fno-trapping-math lets GCC vectorize floorf and min/max selects (fast_exp's range reduction).
# With AVX2 the SiLU and softmax loops now call fast_exp8 and only their tails use fast_exp; on other
# CPUs those loops are the scalar form, which ran scalar without the flag (here, before fast_exp8:
# SiLU on 64 x 3072 306 -> 137 us). The kernels never rely on FP exceptions.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math"]
_loaded: dict[str, object] = {}


def load_cpu_ops():
    """The compiled extension module, building it on first use; None if it cannot be built."""
    if "ops" in _loaded:
        return _loaded["ops"]
    ops = None
    if os.environ.get("KVLOOM_DISABLE_CPU_KERNELS") == "1":
        logger.info("C++ CPU kernels disabled by KVLOOM_DISABLE_CPU_KERNELS=1")
    else:
        try:
            ops = _build()
        except Exception as e:  # any compiler or toolchain failure falls back to the torch path
            logger.warning(
                "C++ CPU kernels unavailable (%s); using the pure-torch attention",
                str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__,
            )
    _loaded["ops"] = ops
    return ops


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), or the platform's machine name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.machine()


def _build():
    from torch.utils import cpp_extension

    digest = hashlib.sha256()
    for src in [*_SOURCES, *(Path(__file__).parent / "cpu" / h for h in ("fast_exp.h", "thread_pool.h"))]:
        digest.update(src.read_bytes())
    digest.update(" ".join(_FLAGS).encode())
    # -march=native: a cache shared by machines of other CPUs (a home directory on another host) must
    # not hand one an extension built for instructions it lacks.
    digest.update(_cpu_flags().encode())
    name = f"kvloom_cpu_ops_{digest.hexdigest()[:12]}"
    cache = Path(os.environ.get("KVLOOM_CACHE_DIR", Path.home() / ".cache" / "kvloom")) / "kernels" / name
    cache.mkdir(parents=True, exist_ok=True)
    if not any(cache.glob(f"{name}*.so")):
        logger.info("compiling the C++ CPU kernels once into %s (about a minute)", cache)
    return cpp_extension.load(
        name=name,
        sources=[str(s) for s in _SOURCES],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(cache),
        verbose=False,
    )
