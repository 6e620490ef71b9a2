"""The ways a CPU ``Linear`` can compute ``x W^T + b``; ``kernel_choice.py`` measures which is fastest.

Every path takes activations in any float dtype and returns the product in fp32 or in the
activations' dtype, never rounded to a narrower one: oneDNN's bf16 GEMM (bf16-packed weights) was
the fastest here from 16 rows on, but it rounds its output to bf16, and with it the bf16 exactness
test failed (error 0.78 against 0.52 allowed), so it is not a path. The stored weight stays as
loaded; a path that wants another layout keeps its own copy.
- ``avx2``, ``avx512``: our kernels (``kernels.py``), fp32 activations, fp32 accumulation.
- ``avx512bf16``: our ``vdpbf16ps`` kernel; activations split into two bf16 parts, fp32 accumulation.
- ``onednn``: oneDNN with an fp32 copy of the weight packed for it (compute-bound GEMMs on AVX2),
  called with the rows padded to one of a bounded set of counts (``padded_rows``).
- ``torch``: ``F.linear`` in the activations' dtype (weights widened per call if they differ): runs
  everywhere, the last resort.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from conveyor.config import LINEAR_KERNELS
from conveyor.engine.model.kernels import KERNELS, gemv_module, missing_isa

PATHS = tuple(k for k in LINEAR_KERNELS if k != "auto")
Product = Callable[[torch.Tensor], torch.Tensor]
EXACT_ROWS = 16  # up to this many rows oneDNN gets them as they are
STEPS_PER_DOUBLING = 8  # above: row counts rounded up to 8 sizes per doubling (at most 12.5 % more)


def padded_rows(rows: int) -> int:
    """The row count the ``onednn`` path computes for ``rows`` rows: one of 16 + 8 per doubling.
    oneDNN builds (JIT-compiles) and caches a primitive per input shape, in torch's ideep cache and
    in its own, 1,024 entries each; with prefill chunks and batches of every length a server's
    cache, and its RSS, grew for hours (tens of KB per new shape; docs/results/soak_rss.md)."""
    if rows <= EXACT_ROWS:
        return rows
    step = (1 << (rows.bit_length() - 1)) // STEPS_PER_DOUBLING  # the doubling's start / 8
    return -(-rows // step) * step


def _onednn(weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.float(), 8)
    b = None if bias is None else bias.float()

    def product(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        x = x.float()
        if (padded := padded_rows(rows)) != rows:
            x = torch.cat([x, x.new_zeros((padded - rows, *x.shape[1:]))])
        return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")[:rows]

    return product


def why_not(path: str, dtype: torch.dtype, in_features: int) -> str | None:
    """Why ``path`` cannot run for a weight of ``dtype`` with ``in_features`` columns here; None if it can."""
    if path not in PATHS:
        return f"unknown kernel {path!r}; choose one of auto, {', '.join(PATHS)}"
    if path == "torch":
        return None
    takes = (torch.bfloat16, torch.float32) if path == "onednn" else (torch.bfloat16,)
    if dtype not in takes:
        return f"{path} does not take {str(dtype).removeprefix('torch.')} weights"
    if path == "onednn":
        return None if torch.backends.mkldnn.is_available() else "this torch build has no oneDNN"
    if missing := missing_isa(path):
        return f"{path} needs {', '.join(missing)}, which this CPU lacks"
    if in_features % KERNELS[path][1]:
        return f"{path} needs in_features divisible by {KERNELS[path][1]}, got {in_features}"
    if gemv_module() is None:
        return "the kernels failed to build (see the warning above)"
    return self_check(path)


def make(path: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Product:
    """The product function of ``path`` for this weight (call ``why_not`` first)."""
    if path in KERNELS:
        gemv = getattr(gemv_module(), f"gemv_{path}")
        if bias is None:
            return lambda x: gemv(x, weight)
        return lambda x: gemv(x, weight).add_(bias)
    if path == "onednn":
        return _onednn(weight, bias)
    return lambda x: F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


@functools.cache
def self_check(path: str) -> str | None:
    """One product of ``path`` against ``F.linear`` in fp32 (11 rows: a full group of 8 and a
    partial one); a reason if it is off by more than rounding explains."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(40, 96, generator=generator).bfloat16()
    b = torch.randn(40, generator=generator)
    x = torch.randn(11, 96, generator=generator)
    want = F.linear(x, w.float(), b)
    try:
        got = make(path, w, b)(x).float()
    except RuntimeError as e:
        return f"{path} failed its self-check: {e}"
    error = (got - want).abs().max().item()
    if not error <= 1e-3 * want.abs().max().item():  # also false for NaN
        return f"{path} failed its self-check: off by {error:.3g} from F.linear in fp32"
    return None
