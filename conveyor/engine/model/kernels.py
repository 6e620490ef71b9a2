"""Our one hand-written CPU kernel (csrc/gemv_bf16.cpp), compiled on first use and cached.

It multiplies bf16 weights by up to 32 activation rows, reading each weight from memory once:
PyTorch's own bf16 path on AVX2-only CPUs re-reads (and re-widens) the weights
for every row. Built with torch's C++ extension loader into
``$CONVEYOR_CACHE/kernels/``; if it cannot be built (no compiler, no AVX2) the
engine warns once and falls back to PyTorch's kernels.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

from conveyor.config import cache_root

SOURCE = Path(__file__).parent / "csrc" / "gemv_bf16.cpp"
MAX_ROWS = 32


@functools.cache
def gemv_kernel() -> ModuleType | None:
    """The compiled extension, or None where it is unavailable on this machine."""
    if platform.machine() not in ("x86_64", "AMD64") or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return None
    from rich.console import Console
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    build_dir = cache_root() / "kernels" / f"gemv_bf16-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob("*.so"))
    try:
        status = Console(stderr=True).status("compiling the bf16 decode kernel (once, about a minute)")
        with status if fresh else contextlib.nullcontext():
            return load(f"conveyor_gemv_{digest}", [str(SOURCE)], build_directory=str(build_dir),
                        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # any build failure: keep serving with PyTorch's kernels
        warnings.warn(f"bf16 decode kernel unavailable, using PyTorch's bf16 matmul: {e}", stacklevel=2)
        return None

