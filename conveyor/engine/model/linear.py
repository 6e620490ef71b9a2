"""A linear layer that picks the fastest kernel this machine has for each batch size.

On CPUs without native bf16 dot products (AVX2-only x86, such as this project's
CI machine), PyTorch's bf16 GEMM re-reads and re-widens the weights for every
row: the default model's layers took 0.43 s for 8 rows against 0.07 s for one.
So on such CPUs a bf16 layer runs
- up to ``SMALL_BATCH`` rows through our AVX2 kernel (``kernels.py``), which
  reads each bf16 weight from memory once and accumulates in fp32;
- more rows (prefill chunks, large decode batches) through oneDNN with an
  fp32-packed copy of the weight, which is compute-bound there and fastest.
Both paths accumulate in fp32 and return the input's dtype (the model keeps its
activations in fp32 on such CPUs, see ``llama.activation_dtype``); the stored
weight stays bf16. fp32 layers always use the packed weight.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from conveyor.engine.model.kernels import MAX_ROWS, gemv_kernel

SMALL_BATCH = 16     # from 17-20 rows on, oneDNN's fp32 path was as fast here
assert SMALL_BATCH <= MAX_ROWS


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN can run bf16 matmuls natively on this CPU (AVX512-BF16/AMX class)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class Linear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` of shape ``[out_features, in_features]``."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, bias: bool = False,
                 bias_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (torch.nn.Parameter(torch.empty(out_features, dtype=bias_dtype or dtype), requires_grad=False)
                     if bias else None)
        self._packed: torch.Tensor | None = None
        self._packed_bias: torch.Tensor | None = None
        self._gemv = None

    def set(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load weights (any dtype; converted to this layer's)."""
        self.weight.copy_(weight)
        if self.bias is not None:
            if bias is None:
                raise ValueError("missing bias")
            self.bias.copy_(bias)

    def pack(self) -> None:
        """Choose kernels for this machine once the weights are loaded (CPU only)."""
        w = self.weight
        if w.device.type != "cpu" or w.dtype not in (torch.bfloat16, torch.float32):
            return
        if w.dtype == torch.bfloat16:
            if cpu_has_fast_bf16():
                return
            if w.shape[1] % 16 == 0:
                self._gemv = gemv_kernel()
        if torch.backends.mkldnn.is_available():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.float(), 8)
            self._packed_bias = None if self.bias is None else self.bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self._gemv is not None and 0 < rows <= SMALL_BATCH:
            y = self._gemv.gemv_bf16(x, self.weight)
            if self.bias is not None:
                y += self.bias
            return y.to(x.dtype)
        if self._packed is None:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.float(), self._packed, self._packed_bias, "none", [], "")
        return y.to(x.dtype)
