"""GGUF quantized weights kept as they are in the file: block formats, de-quantization and products.

A weight of ``N`` rows and ``K`` columns is a uint8 tensor ``[N, row_bytes(qtype, K)]``: each row is
``K / block_elems`` blocks of the GGUF type, exactly the bytes of the file. Two operations:
- ``dequantize(blocks, qtype, out)``: into a caller-owned fp32 or bf16 ``[N, K]`` buffer (prefill
  reuses one scratch buffer per shape), bit-exact with ``gguf.quants`` (bf16: rounded to nearest even).
- ``qmatmul(x, blocks, qtype, kernel)``: fp32 activations ``[M, K]`` times the weight, fp32 ``[M, N]``;
  the kernels (``QKERNELS``) de-quantize in registers and reuse each weight block for every row.
``reference_matmul`` is the definition both are tested against: ``gguf.quants`` to fp32, then
``torch.matmul``.
"""

from __future__ import annotations

import functools
import platform
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from conveyor.engine.model.kernels import build_extension, cpu_flags, sources_digest


@dataclass(frozen=True, slots=True)
class QuantType:
    """One GGUF block format: ``block_elems`` weights stored in ``block_bytes`` bytes."""

    name: str
    ggml_type: int
    block_elems: int
    block_bytes: int


def _quant_type(name: str) -> QuantType:
    ggml_type = GGMLQuantizationType[name]
    block_elems, block_bytes = gguf_quants.GGML_QUANT_SIZES[ggml_type]
    return QuantType(name, int(ggml_type), block_elems, block_bytes)


# The K-quants of Q4_K_M / Q5_K_M files, and the 32-element types: the default model keeps most of
# its matrices in Q5_0 (ffn_down in Q4_K / Q6_K, V and the output layer in Q8_0); SmolLM2 is Q4_1.
QUANT_TYPES: dict[str, QuantType] = {
    name: _quant_type(name) for name in ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
}

# The order of enum QType in csrc/quant.h.
QTYPE_IDS = {
    name: i for i, name in enumerate(("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"))
}
SOURCES = (
    "quant.cpp",
    "quant_avx2.cpp",
    "quant_avx512.cpp",
    "quant_avx512vnni.cpp",
    "quant_x16_pack.cpp",
    "quant_x16_avx2.cpp",
    "quant_x16_avx512vnni.cpp",
)
HEADERS = ("quant.h", "quant_types.h", "quant_kernel.h", "quant_x16.h")

# kernel name -> what it multiplies the weights with: fp32 activations as given, or activations
# rounded to 8 bits per block of 32 (scale max|x| / 127, as llama.cpp's q8_0), so each is off by at
# most half its block's scale
ACTIVATIONS: dict[str, str] = {
    "q_avx2": "fp32",
    "q_avx512": "fp32",
    "q_avx512vnni": "int8",
    "q_avx2_x16": "int8",
    "q_vnni_x16": "int8",
}

# kernel name -> the /proc/cpuinfo flags it needs
QKERNELS: dict[str, tuple[str, ...]] = {
    "q_avx2": ("avx2", "fma", "f16c"),
    "q_avx512": ("avx512f", "avx512bw"),
    "q_avx512vnni": ("avx512f", "avx512bw", "avx512_vnni"),
    "q_avx2_x16": ("avx2", "fma", "f16c"),
    "q_vnni_x16": ("avx512f", "avx512bw", "avx512_vnni"),
}

# kernels that run on the weight repacked into their own layout (``repack``), and the types they take:
# the x16 kernels interleave 16 rows so that one dot product instruction serves all of them
# (csrc/quant_x16.h; vpdpbusd on AVX512_VNNI, vpmaddubsw on AVX2)
_X16_TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K")
REPACKED: dict[str, tuple[str, ...]] = {"q_avx2_x16": _X16_TYPES, "q_vnni_x16": _X16_TYPES}
_X16_ISA = {"q_avx2_x16": "avx2", "q_vnni_x16": "avx512vnni"}


def row_bytes(qtype: str, k: int) -> int:
    """Bytes of one weight row of ``k`` columns (``k`` must be a multiple of the block size)."""
    t = _type(qtype)
    if k <= 0 or k % t.block_elems:
        raise ValueError(
            f"{qtype} needs a column count that is a positive multiple of {t.block_elems}, got {k}"
        )
    return k // t.block_elems * t.block_bytes


def check_shape(qtype: str, n: int, k: int, nbytes: int) -> None:
    """Raise ValueError unless ``nbytes`` is exactly an ``n`` x ``k`` weight of ``qtype``."""
    if n <= 0:
        raise ValueError(f"a {qtype} weight needs at least one row, got {n}")
    want = n * row_bytes(qtype, k)
    if nbytes != want:
        raise ValueError(f"a {n}x{k} {qtype} weight is {want} bytes, got {nbytes}")


def _type(qtype: str) -> QuantType:
    if qtype not in QUANT_TYPES:
        raise ValueError(f"unsupported quantization type {qtype!r}; supported: {', '.join(QUANT_TYPES)}")
    return QUANT_TYPES[qtype]


def _check_blocks(blocks: torch.Tensor, qtype: str, k: int) -> int:
    """The row count of ``blocks`` after checking it holds ``[N, row_bytes(qtype, k)]`` uint8."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_contiguous():
        raise ValueError(
            f"blocks must be a contiguous uint8 [N, row_bytes] tensor, got {blocks.dtype} "
            f"{tuple(blocks.shape)}"
        )
    check_shape(qtype, blocks.shape[0], k, blocks.numel())
    return blocks.shape[0]


def _columns(blocks: torch.Tensor, qtype: str) -> int:
    t = _type(qtype)
    if blocks.dim() != 2 or blocks.shape[1] % t.block_bytes:
        raise ValueError(
            f"a {qtype} row is a multiple of {t.block_bytes} bytes, got shape {tuple(blocks.shape)}"
        )
    return blocks.shape[1] // t.block_bytes * t.block_elems


def reference_dequantize(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """fp32 ``[N, K]`` by ``gguf.quants`` (numpy): the definition of every type's values."""
    k = _columns(blocks, qtype)
    _check_blocks(blocks, qtype, k)
    values = gguf_quants.dequantize(blocks.numpy(), GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(blocks.shape[0], k)


def reference_matmul(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """``x`` [M, K] times the de-quantized weight, transposed: fp32 [M, N]."""
    return torch.matmul(x.float(), reference_dequantize(blocks, qtype).T)


def dequantize(blocks: torch.Tensor, qtype: str, out: torch.Tensor) -> torch.Tensor:
    """Write the weight's values into ``out`` (fp32 or bf16 ``[N, K]``, contiguous) and return it."""
    if out.dtype not in (torch.float32, torch.bfloat16) or out.dim() != 2 or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous fp32 or bf16 [N, K] tensor, got {out.dtype} {tuple(out.shape)}"
        )
    n = _check_blocks(blocks, qtype, out.shape[1])
    if out.shape[0] != n:
        raise ValueError(f"out has {out.shape[0]} rows, the weight {n}")
    if (kernel := _dequantize_kernel()) is None:
        out.copy_(reference_dequantize(blocks, qtype))
    else:
        quant_module().dequantize(blocks, QTYPE_IDS[qtype], out, kernel.removeprefix("q_"))
    return out


def _dequantize_kernel() -> str | None:
    """The widest kernel that runs here (de-quantization is bit-exact in every one), or None."""
    return next((k for k in ("q_avx512", "q_avx2") if qkernel_why_not(k, "Q8_0") is None), None)


def qkernel_why_not(kernel: str, qtype: str) -> str | None:
    """Why ``kernel`` cannot multiply ``qtype`` weights here (a missing instruction set, a failed
    build, an unknown name); None if it can."""
    if qtype not in QUANT_TYPES:
        return f"unsupported quantization type {qtype!r}; supported: {', '.join(QUANT_TYPES)}"
    if kernel not in QKERNELS:
        return f"unknown quantized kernel {kernel!r}; known: {', '.join(QKERNELS)}"
    if kernel in REPACKED and qtype not in REPACKED[kernel]:
        return f"{kernel} takes {', '.join(REPACKED[kernel])} weights, not {qtype}"
    if missing := _missing_isa(kernel):
        return f"{kernel} needs {', '.join(missing)}, which this CPU lacks"
    if quant_module() is None:
        return "the quantized kernels failed to build (see the warning above)"
    return None


def _missing_isa(kernel: str) -> list[str]:
    needed = QKERNELS[kernel]
    if platform.machine() not in ("x86_64", "AMD64"):
        return list(needed)
    return [f for f in needed if f not in cpu_flags()]


def qmatmul(x: torch.Tensor, blocks: torch.Tensor, qtype: str, kernel: str) -> torch.Tensor:
    """fp32 ``x`` [M, K] (contiguous) times the quantized weight [N, K], transposed: fp32 [M, N]."""
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() or x.shape[0] < 1:
        raise ValueError(
            f"x must be a contiguous fp32 [M, K] tensor with M >= 1, got {x.dtype} {tuple(x.shape)}"
        )
    _check_blocks(blocks, qtype, x.shape[1])
    if reason := qkernel_why_not(kernel, qtype):
        raise ValueError(f"kernel {kernel} cannot run: {reason}")
    if kernel in REPACKED:  # the layout made for this one call (layers keep theirs: ``repack``)
        return qmatmul_repacked(x, repack(blocks, qtype, kernel), qtype, kernel, blocks.shape[0])
    return quant_module().qmatmul(x, blocks, QTYPE_IDS[qtype], kernel.removeprefix("q_"))


def repack(blocks: torch.Tensor, qtype: str, kernel: str) -> torch.Tensor:
    """The file's rows of blocks (``[N, row_bytes]``) in ``kernel``'s layout (``REPACKED``), as
    many bytes as the blocks (plus the zero rows that round N up to 16)."""
    k = _columns(blocks, qtype)
    _check_blocks(blocks, qtype, k)
    if reason := qkernel_why_not(kernel, qtype):
        raise ValueError(f"kernel {kernel} cannot run: {reason}")
    return quant_module().repack_x16(blocks, QTYPE_IDS[qtype], k)


def qmatmul_repacked(x: torch.Tensor, packed: torch.Tensor, qtype: str, kernel: str, n: int) -> torch.Tensor:
    """fp32 ``x`` [M, K] times a weight of ``n`` rows in ``kernel``'s layout (``repack``): fp32 [M, n]."""
    if x.dtype != torch.float32 or x.dim() != 2 or not x.is_contiguous() or x.shape[0] < 1:
        raise ValueError(
            f"x must be a contiguous fp32 [M, K] tensor with M >= 1, got {x.dtype} {tuple(x.shape)}"
        )
    return repacked_product(packed, qtype, kernel, n)(x)


def repacked_product(
    packed: torch.Tensor, qtype: str, kernel: str, n: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``qmatmul_repacked`` bound to one weight, for the decode loop: no Python checks per call
    (the compiled op checks ``x``, raising RuntimeError)."""
    op, qtype_id, isa = quant_module().qmatmul_x16, QTYPE_IDS[qtype], _X16_ISA[kernel]
    return lambda x: op(x, packed, qtype_id, n, isa)


def source_digest() -> str:
    return sources_digest((*SOURCES, *HEADERS))


@functools.cache
def quant_module() -> ModuleType | None:
    """The compiled extension (``$CONVEYOR_CACHE/kernels/quant-*``), or None where it cannot be built."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        # -ffp-contract=off: de-quantized values round as gguf.quants' separate multiply and add
        return build_extension(
            "quant", SOURCES, source_digest(), "quantized-weight kernels", ("-ffp-contract=off",)
        )
    except Exception as e:  # noqa: BLE001 -- any build failure: the engine keeps its de-quantize-at-load path
        warnings.warn(f"quantized-weight kernels unavailable: {e}", stacklevel=2)
        return None
