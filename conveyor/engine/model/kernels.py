"""Our hand-written CPU kernels (csrc/), compiled once into extension modules and cached.

They multiply bf16 weights by activation rows, reading each weight from memory once per call;
one file per instruction set: AVX2 (widen and FMA), AVX-512F (the same on 64-byte registers)
and AVX512_BF16 (``vdpbf16ps``). Built with torch's C++ extension loader into
``$CONVEYOR_CACHE/kernels/``; if the build fails (no compiler, old assembler) the engine warns
once and uses PyTorch's kernels. Which kernel runs where is measured, not assumed
(``kernel_choice.py``); a kernel whose instruction set this CPU lacks is never called.
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

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("gemv.cpp", "gemv_avx2.cpp", "gemv_avx512.cpp", "gemv_avx512bf16.cpp")
# kernel name -> (the /proc/cpuinfo flags it needs, the K it needs a multiple of)
KERNELS: dict[str, tuple[tuple[str, ...], int]] = {
    "avx2": (("avx2", "fma"), 16),
    "avx512": (("avx512f", "avx512bw"), 32),
    "avx512bf16": (("avx512f", "avx512bw", "avx512_bf16"), 32),
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def missing_isa(kernel: str) -> list[str]:
    """The instruction sets ``kernel`` needs that this CPU lacks (all of them off x86-64)."""
    needed = KERNELS[kernel][0]
    if platform.machine() not in ("x86_64", "AMD64"):
        return list(needed)
    return [f for f in needed if f not in cpu_flags()]


def source_digest() -> str:
    return sources_digest((*SOURCES, "gemv.h"))


def sources_digest(names: tuple[str, ...]) -> str:
    """A short hash of these csrc/ files and the torch version: the key of their build."""
    data = b"".join((CSRC / name).read_bytes() for name in names)
    return hashlib.sha256(data + torch.__version__.encode()).hexdigest()[:12]


def build_extension(
    name: str, sources: tuple[str, ...], digest: str, what: str, extra_cflags: tuple[str, ...] = ()
) -> ModuleType:
    """Compile csrc/ ``sources`` into ``$CONVEYOR_CACHE/kernels/<name>-<digest>`` (once; a status
    line names ``what`` while a fresh build runs) and load it. Raises whatever the build raises."""
    from rich.console import Console
    from torch.utils.cpp_extension import load

    build_dir = cache_root() / "kernels" / f"{name}-{digest}"
    build_dir.mkdir(parents=True, exist_ok=True)
    fresh = not any(build_dir.glob("*.so"))
    status = Console(stderr=True).status(f"compiling the {what} (once, about a minute)")
    with status if fresh else contextlib.nullcontext():
        return load(
            f"conveyor_{name}_{digest}",
            [str(CSRC / s) for s in sources],
            build_directory=str(build_dir),
            extra_include_paths=[str(CSRC)],
            extra_cflags=["-O3", "-fopenmp", *extra_cflags],
            extra_ldflags=["-fopenmp"],
        )


@functools.cache
def gemv_module() -> ModuleType | None:
    """The compiled extension, or None where it cannot be built on this machine."""
    if platform.machine() not in ("x86_64", "AMD64") or not any(not missing_isa(k) for k in KERNELS):
        return None
    try:
        return build_extension("gemv", SOURCES, source_digest(), "bf16 decode kernels")
    except Exception as e:  # noqa: BLE001 - any build failure: keep serving with PyTorch's kernels
        warnings.warn(f"bf16 decode kernels unavailable, using PyTorch's matmuls: {e}", stacklevel=2)
        return None


@functools.cache
def fused_module() -> ModuleType | None:
    """The fused decoder-layer glue (csrc/fused.cpp: RoPE, cast, KV store in one op), or None
    where it cannot be built (the model then runs the same steps as PyTorch ops)."""
    try:
        # -ffp-contract=off: the same roundings as PyTorch's separate multiplies and adds
        return build_extension(
            "fused", ("fused.cpp",), sources_digest(("fused.cpp",)), "fused layer ops", ("-ffp-contract=off",)
        )
    except Exception as e:  # noqa: BLE001 - any build failure: PyTorch ops do the same work
        warnings.warn(f"fused layer ops unavailable, using PyTorch's: {e}", stacklevel=2)
        return None
