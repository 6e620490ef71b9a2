"""Linear layers and the embedding over GGUF quantized blocks, kept as they are in the file.

A ``QuantLinear`` holds its weight as rows of blocks (``uint8 [out_features, row_bytes]``, see
``quant.py``) and runs, per row bucket, one of these paths, measured by ``kernel_choice.py``:
- each kernel of ``quant.QKERNELS`` (de-quantizes in registers; fp32 activations, or rounded to
  8 bits per block of 32 where ``quant.ACTIVATIONS`` says so); a repacking kernel
  (``quant.REPACKED``) takes every bucket, and the layer then keeps only the repacked weight;
- ``dequant``: de-quantize a tile of rows into a scratch buffer (one per tile shape, shared by
  every layer of the model: no fp32 or bf16 copy of any weight is kept), then ``torch.mm`` in
  fp32 (oneDNN / MKL) on it; for prefill chunks and large batches.
The layer takes and returns fp32 activations; products accumulate in fp32 (or int32 per block).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from conveyor.engine.model import quant
from conveyor.engine.model.linear import bucket_of
from conveyor.engine.model.paths import Product

DEQUANT = "dequant"
TILE_BYTES = 8 * 2**20  # fp32 bytes of one de-quantized tile: stays in the last-level cache


def quant_paths() -> tuple[str, ...]:
    return (*quant.QKERNELS, DEQUANT)


@dataclass(frozen=True, slots=True)
class QuantWeight:
    """An ``[out_features, in_features]`` matrix of ``qtype`` blocks: ``blocks`` is uint8, the file's
    rows ``[out_features, row_bytes]``, or a repacking kernel's layout (``layout``, ``quant.repack``).
    ``mapped``: the blocks are the file's memory-mapped pages."""

    qtype: str
    blocks: torch.Tensor
    in_features: int
    out_features: int
    layout: str | None = None
    mapped: bool = False


class Scratch:
    """The fp32 tiles the ``dequant`` path de-quantizes into, one per tile shape, shared by all
    layers of one model (the engine runs one layer at a time)."""

    def __init__(self) -> None:
        self._tiles: dict[tuple[int, int], torch.Tensor] = {}

    def tile(self, rows: int, cols: int) -> torch.Tensor:
        key = (rows, cols)
        if key not in self._tiles:
            self._tiles[key] = torch.empty(rows, cols)
        return self._tiles[key]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._tiles.values())


def tile_rows(weight: QuantWeight) -> int:
    """Weight rows per de-quantized tile: about ``TILE_BYTES`` of fp32, a multiple of 64."""
    rows = max(64, TILE_BYTES // (4 * weight.in_features) // 64 * 64)
    return min(rows, weight.out_features)


def quant_why_not(path: str, qtype: str) -> str | None:
    """Why ``path`` cannot multiply ``qtype`` blocks here; None if it can."""
    if path == DEQUANT:
        return None
    if path not in quant.QKERNELS:
        return f"unknown quantized kernel {path!r}; choose one of auto, {', '.join(quant_paths())}"
    return quant.qkernel_why_not(path, qtype)


def make_quant(path: str, weight: QuantWeight, bias: torch.Tensor | None, scratch: Scratch) -> Product:
    """The product function of ``path`` for this weight (call ``quant_why_not`` first)."""
    if path == DEQUANT:
        product = _dequant_product(weight, scratch)
    elif path in quant.REPACKED:
        packed = weight.blocks if weight.layout == path else quant.repack(weight.blocks, weight.qtype, path)
        op = quant.repacked_product(packed, weight.qtype, path, weight.out_features)
        product = lambda x: op(x.float().contiguous())
    else:
        blocks, qtype = weight.blocks, weight.qtype
        product = lambda x: quant.qmatmul(x.float().contiguous(), blocks, qtype, path)
    if bias is None:
        return product
    return lambda x: product(x).add_(bias)


def _dequant_product(weight: QuantWeight, scratch: Scratch) -> Product:
    rows, blocks, qtype = tile_rows(weight), weight.blocks, weight.qtype
    starts = range(0, weight.out_features, rows)

    def product(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        tile = scratch.tile(rows, weight.in_features)
        out = x.new_empty((weight.out_features, x.shape[0]))  # transposed: each tile's rows are contiguous
        for start in starts:
            stop = min(start + rows, weight.out_features)
            w = quant.dequantize(blocks[start:stop], qtype, tile[: stop - start])
            torch.mm(w, x.t(), out=out[start:stop])
        return out.t().contiguous()

    return product


def drop_pages(address: int, nbytes: int) -> None:
    """Give back the whole pages of file-mapped memory [address, address + nbytes) that is no
    longer read (they are the file's: touched again, they would be read from it), so the file's
    bytes do not stay in the RSS."""
    page = mmap.PAGESIZE
    begin, end = -(-address // page) * page, (address + nbytes) // page * page
    if end > begin:
        _libc().madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), mmap.MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class QuantLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` as quantized blocks; the path per row bucket is chosen by
    measurement (``use``), like ``Linear``'s."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None, scratch: Scratch) -> None:
        super().__init__()
        if weight.layout is None:
            quant.check_shape(weight.qtype, weight.out_features, weight.in_features, weight.blocks.numel())
        self.qweight, self.scratch = weight, scratch
        self.bias = None if bias is None else torch.nn.Parameter(bias.float(), requires_grad=False)
        self.plan: list[str] | None = None
        self._products: list[Product] = []

    @property
    def shape_key(self) -> str:
        return f"{self.qweight.qtype} {self.qweight.out_features}x{self.qweight.in_features}"

    @property
    def in_features(self) -> int:
        return self.qweight.in_features

    @property
    def nbytes(self) -> int:
        return self.qweight.blocks.nbytes

    def path_reasons(self, act_dtype: torch.dtype) -> dict[str, str | None]:
        """Every quantized path, with why it cannot run here (None: it can)."""
        if layout := self.qweight.layout:
            return {p: None if p == layout else f"the weight is repacked for {layout}" for p in quant_paths()}
        return {p: quant_why_not(p, self.qweight.qtype) for p in quant_paths()}

    def product(self, path: str) -> Product:
        return make_quant(path, self.qweight, self.bias, self.scratch)

    def use(self, plan: list[str]) -> None:
        """Run ``plan`` (a path per row bucket). A repacking kernel takes every bucket: the weight
        is repacked once and the file's copy given back."""
        layouts = {path for path in plan if path in quant.REPACKED}
        if layouts and set(plan) != layouts:
            raise ValueError(
                f"{self.shape_key}: {', '.join(layouts)} repacks the weight: it runs every row count"
            )
        if layouts and self.qweight.layout != plan[0]:
            self._repack(plan[0])
        made = {path: self.product(path) for path in dict.fromkeys(plan)}
        self.plan, self._products = list(plan), [made[path] for path in plan]

    def _repack(self, layout: str) -> None:
        old = self.qweight
        packed = quant.repack(old.blocks, old.qtype, layout)
        self.qweight = QuantWeight(old.qtype, packed, old.in_features, old.out_features, layout)
        if old.mapped:
            drop_pages(old.blocks.data_ptr(), old.blocks.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows == 0:
            return x.new_empty((0, self.qweight.out_features))
        product = self._products[bucket_of(rows)] if self._products else self.product(DEQUANT)
        return product(x).to(x.dtype)


class QuantEmbedding(torch.nn.Module):
    """Token embeddings kept as the file's blocks (any GGUF type); the rows a step looks up are
    de-quantized on lookup (gguf's numpy de-quantizer: a few rows per decode step)."""

    def __init__(
        self, ggml_type: GGMLQuantizationType, blocks: np.ndarray, dim: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.ggml_type, self.blocks, self.dim, self.dtype = ggml_type, blocks, dim, dtype

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = gguf_quants.dequantize(self.blocks[input_ids.cpu().numpy()], self.ggml_type)
        return torch.from_numpy(rows.reshape(-1, self.dim)).to(device=input_ids.device, dtype=self.dtype)
