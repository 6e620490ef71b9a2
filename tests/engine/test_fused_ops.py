"""The fused layer glue (``csrc/fused.cpp``): bit-identical to the PyTorch ops it replaces."""

from __future__ import annotations

import pytest
import torch

from conveyor.engine.model.attention import write_kv
from conveyor.engine.model.kernels import fused_module
from conveyor.engine.model.llama import apply_rope

H, KV, D = 6, 2, 16


@pytest.fixture(scope="module")
def fused():
    module = fused_module()
    if module is None:
        pytest.skip("the fused layer ops did not build here (see the warning)")
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store_kv_equals_the_pytorch_steps(fused, dtype: torch.dtype) -> None:
    tokens, slots = 5, torch.tensor([3, 9, 0, 17, 4])
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, (H + 2 * KV) * D, generator=generator)
    qkv[1, 3] = float("nan")
    freqs = torch.randn(tokens, D // 2, generator=generator)
    cos, sin = freqs.cos(), freqs.sin()
    caches = [torch.zeros(3, 8, KV, D, dtype=dtype) for _ in range(4)]
    q, k, v = fused.rope_store_kv(qkv, cos, sin, caches[0], caches[1], slots, H, KV, D)
    q0, k0, v0 = qkv.split([H * D, KV * D, KV * D], dim=-1)
    want_q = apply_rope(q0.view(-1, H, D), cos[:, None], sin[:, None]).to(dtype)
    want_k = apply_rope(k0.view(-1, KV, D), cos[:, None], sin[:, None]).to(dtype)
    want_v = v0.reshape(-1, KV, D).to(dtype)
    write_kv(caches[2], caches[3], want_k, want_v, slots)
    for got, want in ((q, want_q), (k, want_k), (v, want_v), (caches[0], caches[2]), (caches[1], caches[3])):
        assert got.dtype == dtype  # equal values, a NaN where PyTorch has one (its payload may differ)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_a_slot_out_of_range_is_refused(fused) -> None:
    cache = torch.zeros(2, 4, KV, D)
    with pytest.raises(RuntimeError, match="slot out of range"):
        fused.rope_store_kv(
            torch.zeros(1, (H + 2 * KV) * D),
            torch.ones(1, D // 2),
            torch.zeros(1, D // 2),
            cache,
            cache.clone(),
            torch.tensor([8]),
            H,
            KV,
            D,
        )
    assert not cache.any()


def test_rms_norm_matches_pytorch_within_fp32_rounding(fused) -> None:
    """Its mean of squares is summed in double, PyTorch's in fp32 in its own order: a few units in
    the last place apart at most."""
    generator = torch.Generator().manual_seed(1)
    x, w = torch.randn(7, 896, generator=generator) * 3, torch.randn(896, generator=generator)
    want = torch.nn.functional.rms_norm(x.double(), (896,), w.double(), 1e-6)
    got = fused.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert ((got.double() - want).abs() <= 4 * 2.0**-24 * want.abs() + 1e-30).all()
    with pytest.raises(RuntimeError, match="w must be fp32"):
        fused.rms_norm(x, w[:10], 1e-6)
