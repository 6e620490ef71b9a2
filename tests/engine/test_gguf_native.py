"""Native GGUF weights on tiny random models: the engine's greedy tokens against transformers in
fp32 on the same file, what each tensor became, and every quantized path against the reference."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants
from transformers import AutoModelForCausalLM

from conveyor.core.request import SamplingParams
from conveyor.engine.model import kernel_choice, qlinear, quant
from conveyor.engine.model.gguf_weights import Concat, as_q8_0
from conveyor.engine.model.linear import BUCKETS, Linear
from conveyor.engine.model.qlinear import (
    DEQUANT,
    QuantEmbedding,
    QuantLinear,
    quant_paths,
)
from tests.engine.helpers import assert_all_blocks_free, make_engine
from tests.gguf_tiny import private_model_cache, write_tiny_gguf


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp(f"gguf-{request.param}") / "tiny.gguf", request.param)


@pytest.fixture(autouse=True)
def private_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_CACHE", str(private_model_cache(tmp_path)))


def hf_greedy_gguf(gguf: Path, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers de-quantizes the same file to fp32 (it undoes llama.cpp's Q/K row order itself)."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=str(gguf), dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=num_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def test_native_greedy_tokens_match_transformers_fp32(tiny_gguf: Path) -> None:
    """With fp32 activations. Rounded to 8 bits (llama.cpp's scheme, the default) they move these
    random weights' near-tied logits within a few tokens, so 8-bit activations are held to the
    kernels' bound (tests/engine/test_quant_kernels.py) and to the default model's greedy tokens
    (tests/e2e/test_native_default.py)."""
    engine = make_engine(
        tiny_gguf, weights="native", num_blocks=64, block_size=4, budget=16, quant_activations="fp32"
    )
    prompts = [engine.encode([{"role": "user", "content": text}]) for text in ("hello there", "a b c d e f")]
    requests = engine.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    for prompt, request in zip(prompts, requests):
        assert request.output_token_ids == hf_greedy_gguf(tiny_gguf, prompt, 24)
    assert_all_blocks_free(engine)


def test_each_tensor_kept_fused_split_or_dequantized(
    tiny_gguf: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="conveyor.gguf"):
        engine = make_engine(tiny_gguf, weights="native")
    model = engine.runner.model
    first, second = model.layers
    assert isinstance(first.qkv, Concat) and [p.qweight.qtype for p in first.qkv.parts] == [
        "Q4_K",
        "Q5_0",
        "Q8_0",
    ]
    assert isinstance(second.qkv, QuantLinear) and second.qkv.qweight.qtype == "Q8_0"  # Q5_0 rewritten
    assert first.gate_up.shape_key == "Q5_K 1024x256" and second.gate_up.shape_key == "Q4_0 1024x256"
    assert isinstance(second.o_proj, Linear)  # Q3_K: no kernel, de-quantized
    assert isinstance(model.embed, QuantEmbedding)
    assert isinstance(model.lm_head, QuantLinear)
    assert "no native kernels for Q3_K (1 tensors): de-quantized at load" in caplog.text
    assert "Q5_0 (1 tensors) rewritten as Q8_0 without loss" in caplog.text


@pytest.mark.parametrize("source", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q5_0])
def test_q4_0_and_q5_0_rewritten_as_q8_0_exactly(source: GGMLQuantizationType) -> None:
    values = np.random.default_rng(1).normal(0, 1, (6, 96)).astype(np.float32)
    blocks = gguf_quants.quantize(values, source)
    want = gguf_quants.dequantize(blocks, source)
    got = gguf_quants.dequantize(as_q8_0(blocks, source), GGMLQuantizationType.Q8_0)
    assert np.array_equal(got, want)


def _layers(engine) -> list[QuantLinear]:
    return [m for m in engine.runner.model.modules() if isinstance(m, QuantLinear)]


def rounding_bound(x: torch.Tensor, w: torch.Tensor, activations: str) -> float:
    """Largest error a path may make: fp32 accumulation in another order (~K * 2^-24 relative to
    the sum of |x w|), plus, for kernels that round activations to 8 bits per block of 32, half a
    step of each block's scale (max |x| / 127) times |w|."""
    bound = 1e-5 * (x.abs() @ w.abs().T).max().item()
    if activations == "int8":
        step = x.reshape(x.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
        bound += ((step / 2).expand(-1, -1, 32).reshape(x.shape) @ w.abs().T).max().item()
    return bound + 1e-6


@pytest.mark.parametrize("rows", [1, 3, 8, 17, 32, 40])
def test_every_quantized_path_matches_the_reference(
    tiny_gguf: Path, rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qlinear, "TILE_BYTES", 64 * 256 * 4)  # several tiles per weight
    engine = make_engine(tiny_gguf, weights="native", quant_kernel=DEQUANT)
    generator = torch.Generator().manual_seed(rows)
    ran = set()
    for layer in _layers(engine):
        qw = layer.qweight
        x = torch.randn(rows, qw.in_features, generator=generator)
        w = quant.reference_dequantize(qw.blocks, qw.qtype)
        want = x @ w.T + (0 if layer.bias is None else layer.bias)
        for path, reason in layer.path_reasons(torch.float32).items():
            if reason is None:
                got = layer.product(path)(x)
                bound = rounding_bound(x, w, quant.ACTIVATIONS.get(path, "fp32"))
                assert (got - want).abs().max().item() <= bound, (path, layer.shape_key)
                ran.add(path)
    missing = {p: quant.qkernel_why_not(p, "Q8_0") for p in quant_paths() if p not in ran}
    assert all(missing.values()), f"paths never run: {missing}"  # a skipped path names its missing ISA


def test_forced_quant_kernel_is_used_and_a_wrong_name_refused(tiny_gguf: Path) -> None:
    engine = make_engine(tiny_gguf, weights="native", quant_kernel=DEQUANT)
    assert {layer.plan[0] for layer in _layers(engine)} == {DEQUANT}
    with pytest.raises(ValueError, match="--quant-kernel q_nope is not a path"):
        make_engine(tiny_gguf, weights="native", quant_kernel="q_nope")


def test_bf16_weights_still_convert_the_file(tiny_gguf: Path) -> None:
    engine = make_engine(tiny_gguf, weights="bf16", dtype="bfloat16")
    assert not _layers(engine) and any(engine.model_dir.glob("*.safetensors"))


@pytest.mark.parametrize("kernel", list(quant.REPACKED))
def test_a_repacked_weight_runs_every_row_count_within_the_bound(tiny_gguf: Path, kernel: str) -> None:
    engine = make_engine(tiny_gguf, weights="native", quant_kernel=DEQUANT)
    layers = [layer for layer in _layers(engine) if layer.qweight.qtype in quant.REPACKED[kernel]]
    assert layers
    generator = torch.Generator().manual_seed(7)
    for layer in layers:
        if reason := quant.qkernel_why_not(kernel, layer.qweight.qtype):
            pytest.skip(reason)
        w = quant.reference_dequantize(layer.qweight.blocks, layer.qweight.qtype)
        with pytest.raises(ValueError, match="repacks the weight: it runs every row count"):
            layer.use([kernel, *[DEQUANT] * 5])
        layer.use([kernel] * 6)
        assert layer.qweight.layout == kernel and layer.qweight.out_features == w.shape[0]
        assert layer.path_reasons(torch.float32)[DEQUANT] == f"the weight is repacked for {kernel}"
        for rows in (1, 9, 40):
            x = torch.randn(rows, layer.in_features, generator=generator)
            want = x @ w.T + (0 if layer.bias is None else layer.bias)
            assert (layer(x) - want).abs().max().item() <= rounding_bound(x, w, "int8")


def test_a_repacking_kernel_takes_every_bucket_or_none() -> None:
    ms = {"q_vnni_x16": 1.0, "q_avx512": 2.0, "dequant": 0.5}
    wins = {label: {"path": "q_vnni_x16", "ms": dict(ms)} for label, _ in BUCKETS}
    wins["33+"]["path"] = "dequant"
    kernel_choice._one_layout(wins)
    assert {c["path"] for c in wins.values()} == {"q_vnni_x16"}
    loses = {label: {"path": "q_vnni_x16", "ms": dict(ms)} for label, _ in BUCKETS}
    loses["1"]["path"] = "q_avx512"
    kernel_choice._one_layout(loses)
    assert loses["1"]["path"] == "q_avx512" and loses["2-4"]["path"] == "dequant"
