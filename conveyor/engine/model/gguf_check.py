"""A GGUF file's header and tensors checked before anything is loaded or cached: each tensor's
bytes inside the file and not overlapping the next, a known type, rows of whole blocks, and
every tensor the model needs present with the shape its header's config implies. A bad file is
refused with ``BadGGUF`` naming the tensor."""

from __future__ import annotations

import functools
import itertools
import struct
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    ReaderTensor,
)
from gguf import quants as gguf_quants

from conveyor.engine.model.errors import UnsupportedGGUF

if TYPE_CHECKING:
    from conveyor.engine.model.llama import ModelArgs

PLAIN = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
_ITEM_BYTES = {
    GGUFValueType.UINT8: 1,
    GGUFValueType.INT8: 1,
    GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2,
    GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4,
    GGUFValueType.INT32: 4,
    GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8,
    GGUFValueType.INT64: 8,
    GGUFValueType.FLOAT64: 8,
}


class BadGGUF(UnsupportedGGUF):
    """A GGUF whose tensors do not match its header or the model; the message names the tensor."""


class _Reader(GGUFReader):
    """``GGUFReader`` whose tensor errors name the tensor, that checks each tensor's bytes lie
    inside the file before mapping them (gguf's own reader fails on a truncated file with a
    reshape error that names nothing), and that skips array-valued metadata (the tokenizer's
    vocabulary and merges: gguf makes a numpy array per item, 490 MB for the default model's;
    the tokenizer files come from transformers)."""

    def _build_fields(self, offs: int, count: int) -> int:
        if self.byte_order == "S":  # a file of the other byte order: gguf reads it all
            return super()._build_fields(offs, count)
        for _ in range(count):
            (key_len,) = struct.unpack_from("<Q", self.data, offs)
            value = offs + 8 + key_len
            value_type, item_type, num_items = struct.unpack_from("<IIQ", self.data, value)
            if (
                value_type != GGUFValueType.ARRAY
                or item_type not in _ITEM_BYTES
                and item_type != GGUFValueType.STRING
            ):
                offs = super()._build_fields(offs, 1)
                continue
            offs = value + 16
            if item_type == GGUFValueType.STRING:
                for _ in range(num_items):
                    offs += 8 + struct.unpack_from("<Q", self.data, offs)[0]
            else:
                offs += num_items * _ITEM_BYTES[item_type]
        return offs

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        tensors: list[ReaderTensor] = []
        for field in fields:
            name = str(bytes(field.parts[1]), encoding="utf-8", errors="replace")
            _check_extent(name, field, start_offs, self.data.size)
            try:
                super()._build_tensors(start_offs, [field])
            except ValueError as error:
                raise BadGGUF(f"tensor {name}: {error}") from error
            tensors.extend(self.tensors)
        duplicates = [n for n, count in Counter(t.name for t in tensors).items() if count > 1]
        if duplicates:
            raise BadGGUF(f"tensor {duplicates[0]} appears more than once")
        self.tensors = tensors


def _check_extent(name: str, field, start_offs: int, file_size: int) -> None:
    dims, raw_type, offset = field.parts[3], field.parts[4][0], field.parts[5][0]
    try:
        ggml_type = GGMLQuantizationType(int(raw_type))
    except ValueError:
        raise BadGGUF(f"tensor {name}: unknown GGML type id {int(raw_type)}") from None
    block_elems, block_bytes = GGML_QUANT_SIZES[ggml_type]
    if int(dims[0]) % block_elems:
        raise BadGGUF(
            f"tensor {name}: its rows of {int(dims[0])} elements are not whole {ggml_type.name} "
            f"blocks of {block_elems}"
        )
    n_bytes = int(np.prod(dims.astype(np.int64))) // block_elems * block_bytes
    begin = start_offs + int(offset)
    if begin + n_bytes > file_size:
        raise BadGGUF(
            f"tensor {name} ({ggml_type.name}, {dims.tolist()}): its {n_bytes} bytes at offset {begin} "
            f"run past the end of the file ({file_size} bytes): the file is truncated or its header wrong"
        )


def open_gguf(path: Path) -> GGUFReader:
    """Read ``path``'s header and map its tensors (copy-on-write, never written); BadGGUF naming
    the tensor where one lies outside the file, overlaps another or has an unknown type."""
    try:
        reader = _Reader(path, "c")
    except BadGGUF as error:
        raise BadGGUF(f"{path}: {error}") from None
    except (ValueError, IndexError, KeyError, OSError) as error:
        raise BadGGUF(f"cannot read {path} as GGUF: {error}") from error
    ordered = sorted(reader.tensors, key=lambda t: t.data_offset)
    for a, b in itertools.pairwise(ordered):
        if a.data_offset + a.n_bytes > b.data_offset:
            raise BadGGUF(
                f"{path}: tensor {a.name}: its {a.n_bytes} bytes overlap tensor {b.name}: the header's "
                "block count does not match the data"
            )
    return reader


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> (rows, columns) (or (size,)) the model needs; ``output.weight`` is
    optional (absent: tied to the embedding)."""
    h, q, kv, inter = (
        args.hidden_size,
        args.num_heads * args.head_dim,
        args.num_kv_heads * args.head_dim,
        args.intermediate_size,
    )
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (args.vocab_size, h),
        "output_norm.weight": (h,),
        "output.weight": (args.vocab_size, h),
    }
    for i in range(args.num_layers):
        p = f"blk.{i}."
        shapes |= {
            p + "attn_norm.weight": (h,),
            p + "ffn_norm.weight": (h,),
            p + "attn_q.weight": (q, h),
            p + "attn_k.weight": (kv, h),
            p + "attn_v.weight": (kv, h),
            p + "attn_output.weight": (h, q),
            p + "ffn_gate.weight": (inter, h),
            p + "ffn_up.weight": (inter, h),
            p + "ffn_down.weight": (h, inter),
        }
        if args.qkv_bias:
            shapes |= {p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)}
    return shapes


def check_tensors(reader: GGUFReader, args: ModelArgs, path: Path) -> dict[str, ReaderTensor]:
    """The tensors by name, each checked: present, of the shape the header's model needs, of a
    type we can read; BadGGUF naming the first that is not."""
    tensors = {t.name: t for t in reader.tensors}
    for name, shape in expected_shapes(args).items():
        t = tensors.get(name)
        if t is None:
            if name != "output.weight":
                raise BadGGUF(f"{path}: tensor {name} is missing")
            continue
        got = tuple(int(d) for d in reversed(t.shape.tolist()))
        if got != shape:
            raise BadGGUF(
                f"{path}: tensor {name} has shape {list(got)}, the model's header needs {list(shape)}"
            )
        if t.tensor_type not in PLAIN and not _dequantizable(t.tensor_type):
            raise BadGGUF(f"{path}: tensor {name} has type {t.tensor_type.name}, which we cannot read")
    return tensors


@functools.cache
def _dequantizable(ggml_type: GGMLQuantizationType) -> bool:
    try:
        gguf_quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[ggml_type][1]), np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True
