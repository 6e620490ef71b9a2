"""A linear layer that picks the fastest kernel this machine has for each batch size.

On CPUs without native bf16 dot products (AVX2-only x86, such as this project's
CI machine), PyTorch's bf16 GEMM falls back to slow scalar code: 32 tokens
through the default model's layers took 1.9 s in bf16 against 0.43 s in fp32
with oneDNN-prepacked weights. Single-token matrix-vector products are
bandwidth-bound and bf16 reads half the bytes, so they stay in bf16. So on such
CPUs a bf16 layer also keeps an fp32 oneDNN-packed copy of its weight for
multi-row inputs; the stored weight and the KV cache stay bf16 and the fp32
path only adds precision. fp32 layers always use the packed weight.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN can run bf16 matmuls natively on this CPU (AVX512-BF16/AMX class)."""
    return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


class Linear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` of shape ``[out_features, in_features]``."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, bias: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._packed: torch.Tensor | None = None
        self._packed_bias: torch.Tensor | None = None

    def set(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load weights (any dtype; converted to this layer's)."""
        self.weight.copy_(weight)
        if self.bias is not None:
            if bias is None:
                raise ValueError("missing bias")
            self.bias.copy_(bias)

    def pack(self) -> None:
        """Prepare the oneDNN fp32 weight where it is the faster kernel (CPU only)."""
        w = self.weight
        if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return
        if w.dtype == torch.bfloat16 and cpu_has_fast_bf16():
            return
        if w.dtype not in (torch.bfloat16, torch.float32):
            return
        self._packed = torch.ops.mkldnn._reorder_linear_weight(w.float(), 8)
        self._packed_bias = None if self.bias is None else self.bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed
        if packed is None or (x.shape[0] == 1 and x.dtype == torch.bfloat16):
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.float(), packed, self._packed_bias, "none", [], "")
        return y.to(x.dtype)
