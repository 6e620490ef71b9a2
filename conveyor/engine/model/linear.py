"""A linear layer that runs, for each number of activation rows, the path measured fastest here.

The engine's row counts fall into buckets (``BUCKETS``: one decode row, small and large decode
batches, prefill chunks); ``kernel_choice.choose_kernels`` times the paths of ``paths.py`` on the
real weights per shape and bucket and gives each layer its plan with ``use``. Until then (and on
GPUs) a layer runs ``F.linear``. The stored weight keeps its dtype; paths accumulate in fp32 and
the result takes the activations' dtype (fp32 on CPU, see ``llama.activation_dtype``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conveyor.engine.model.paths import PATHS, Product, make, why_not

# (label, the row count it is measured at); rows above 32 (prefill chunks) are the last bucket
BUCKETS = (("1", 1), ("2-4", 4), ("5-8", 8), ("9-16", 16), ("17-32", 32), ("33+", 64))
_BUCKET_OF = [len(BUCKETS) - 1] + [
    next(i for i, (_, top) in enumerate(BUCKETS) if r <= top) for r in range(1, 33)
]


def bucket_of(rows: int) -> int:
    """Index into ``BUCKETS`` of a product with ``rows`` activation rows."""
    return _BUCKET_OF[rows] if rows <= 32 else len(BUCKETS) - 1


class Linear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` of shape ``[out_features, in_features]``."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        dtype: torch.dtype,
        bias: bool = False,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype), requires_grad=False
        )
        self.bias = (
            torch.nn.Parameter(torch.empty(out_features, dtype=bias_dtype or dtype), requires_grad=False)
            if bias
            else None
        )
        self.plan: list[str] | None = None  # path per bucket, once chosen
        self._products: list[Product] = []

    def set(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Load weights (any dtype; converted to this layer's)."""
        self.weight.copy_(weight)
        if self.bias is not None:
            if bias is None:
                raise ValueError("missing bias")
            self.bias.copy_(bias)

    @property
    def shape_key(self) -> str:
        return (
            f"{str(self.weight.dtype).removeprefix('torch.')} {self.weight.shape[0]}x{self.weight.shape[1]}"
        )

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def path_reasons(self, act_dtype: torch.dtype) -> dict[str, str | None]:
        """Every path of ``paths.py``, with why it cannot run here (None: it can)."""
        return {p: why_not(p, self.weight.dtype, self.in_features) for p in PATHS}

    def product(self, path: str) -> Product:
        """The product function of ``path`` over this layer's weights (``paths.why_not`` must allow it)."""
        return make(path, self.weight, self.bias)

    def use(self, plan: list[str]) -> None:
        """Run bucket ``i`` through ``plan[i]``; paths shared by several buckets share one prepared weight."""
        made = {path: self.product(path) for path in dict.fromkeys(plan)}
        self.plan, self._products = list(plan), [made[path] for path in plan]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if not self._products:
            return F.linear(x, self.weight, self.bias)
        if rows == 0:  # a step whose chunks all stop mid-prompt samples no row
            return x.new_empty((0, self.weight.shape[0]))
        return self._products[bucket_of(rows)](x).to(x.dtype)
