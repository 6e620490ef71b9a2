"""Linear kernels: every path (our AVX2 kernel, oneDNN packed fp32, PyTorch) computes the same product."""
from __future__ import annotations

import pytest
import torch

from conveyor.engine.model.kernels import gemv_kernel
from conveyor.engine.model.linear import Linear


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())


@pytest.mark.parametrize("rows", [0, 1, 3, 8, 12, 16, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_matches_fp32_reference(rows: int, dtype: torch.dtype) -> None:
    torch.manual_seed(rows)
    w, b = torch.randn(72, 48), torch.randn(72)
    layer = Linear(72, 48, dtype, bias=True)
    layer.set(w, b)
    layer.pack()
    x = torch.randn(rows, 48).to(dtype)
    want = reference(x, layer.weight, layer.bias)
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 72)
    if rows == 0:                 # a step whose chunks all stop mid-prompt samples no row
        return
    tol = 1e-4 if dtype == torch.float32 else 0.02 * want.abs().max()
    assert (got.float() - want).abs().max() <= tol


def test_gemv_kernel_is_exact_in_fp32_accumulation() -> None:
    kernel = gemv_kernel()
    if kernel is None:
        pytest.skip("the AVX2 kernel is not available on this machine")
    torch.manual_seed(0)
    w = torch.randn(130, 4864).bfloat16()
    for rows in [*range(1, 10), 12, 16, 17, 32]:     # one group of 8 rows, and several
        x = torch.randn(rows, 4864).bfloat16()
        got = kernel.gemv_bf16(x, w)
        assert got.dtype == torch.float32 and got.shape == (rows, 130)
        assert torch.allclose(got, reference(x, w, None), rtol=1e-4, atol=1e-3)
    with pytest.raises(RuntimeError, match="unsupported shape"):
        kernel.gemv_bf16(torch.randn(33, 4864).bfloat16(), w)
