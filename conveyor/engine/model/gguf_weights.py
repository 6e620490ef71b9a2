"""A GGUF file's tensors, checked against its header and the model's shapes (``gguf_check.py``),
loaded into a ``CausalLM`` as they are (``native``) or de-quantized.

Native: tensors of a type the kernels take (``quant.QUANT_TYPES``: Q4_K, Q5_K, Q6_K, Q8_0 and
the 32-element Q4_0, Q4_1, Q5_0, Q5_1) stay rows of blocks, memory-mapped from the file where
they are used as stored; every other quantized type (Q3_K, IQ*, ...) is de-quantized to the
model's dtype, with a one-line notice naming the types. Q/K/V and gate/up are fused by
concatenating rows of blocks where the parts share a type; Q4_0 / Q5_0 parts beside Q8_0 ones
(the default model's V is Q8_0 in half its layers, Q and K Q5_0) are rewritten as Q8_0 without
loss (same 32-element blocks and fp16 scale; their integers fit in int8) and fused; parts of
other mixed types each keep their own product (``Concat``). The token embedding stays in the
file's blocks and is de-quantized per looked-up row (``qlinear.QuantEmbedding``); a tied output
layer multiplies the same blocks.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import (
    GGML_QUANT_SIZES,
    GGMLQuantizationType,
    ReaderTensor,
)
from gguf import quants as gguf_quants

from conveyor.engine.model import quant
from conveyor.engine.model.gguf_check import PLAIN, check_tensors, open_gguf
from conveyor.engine.model.qlinear import (
    QuantEmbedding,
    QuantLinear,
    QuantWeight,
    Scratch,
    drop_pages,
)

if TYPE_CHECKING:
    from conveyor.engine.model.llama import CausalLM, ModelArgs

log = logging.getLogger("conveyor.gguf")
REPACKED_AS_Q8_0 = {GGMLQuantizationType.Q4_0: 8, GGMLQuantizationType.Q5_0: 16}  # type -> integer offset


def as_q8_0(blocks: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Q4_0 / Q5_0 rows of blocks rewritten as Q8_0 rows: the same scale, the integers as int8."""
    size = GGML_QUANT_SIZES[ggml_type][1]
    b = blocks.reshape(-1, size)
    d, qs = b[:, :2], b[:, size - 16 :]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
    if ggml_type == GGMLQuantizationType.Q5_0:
        qh = np.ascontiguousarray(b[:, 2:6]).view("<u4")
        q |= ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    out = np.empty((b.shape[0], 34), np.uint8)
    out[:, :2] = d
    out[:, 2:] = (q.astype(np.int16) - REPACKED_AS_Q8_0[ggml_type]).astype(np.int8).view(np.uint8)
    return out.reshape(blocks.shape[0], -1)


@dataclass(slots=True)
class _Source:
    """The checked tensors of one file, with what became of each type (for the notice)."""

    tensors: dict[str, ReaderTensor]
    row_order: dict[str, np.ndarray]  # GGUF name -> row permutation (llama's Q and K)
    native: bool
    kept: Counter
    repacked: Counter
    dequantized: Counter

    def blocks(self, name: str, to_q8_0: bool = False) -> tuple[str, np.ndarray] | None:
        """(kernel type, rows of blocks) of a tensor the kernels take as it is, or rewritten as
        Q8_0 without loss (where its own type has no kernel, or ``to_q8_0``); None otherwise."""
        t = self.tensors[name]
        data = t.data if name not in self.row_order else t.data[self.row_order[name]]
        if t.tensor_type.name in quant.QUANT_TYPES and not (to_q8_0 and t.tensor_type in REPACKED_AS_Q8_0):
            return t.tensor_type.name, data
        if t.tensor_type in REPACKED_AS_Q8_0 and "Q8_0" in quant.QUANT_TYPES:
            return "Q8_0", as_q8_0(data, t.tensor_type)
        return None

    def dense(self, name: str) -> torch.Tensor:
        """The tensor de-quantized to fp32, in the model's row order."""
        t = self.tensors[name]
        if t.tensor_type in PLAIN:
            values = np.asarray(t.data, dtype=np.float32)
        else:
            values = gguf_quants.dequantize(t.data, t.tensor_type)
        values = values.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        return torch.from_numpy(values[self.row_order[name]] if name in self.row_order else values.copy())

    def linear(
        self, names: list[str], bias_names: list[str] | None, scratch: Scratch
    ) -> torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None]:
        """The parts fused by rows: one QuantLinear over their blocks where native and the parts
        share a kernel type (Q4_0/Q5_0 parts beside Q8_0 ones are rewritten as Q8_0); quantized
        parts of different types each keep their own (``Concat``); else the fused fp32 weight."""
        biases = [self.dense(n) for n in bias_names] if bias_names else None
        bias = torch.cat(biases) if biases else None
        parts = [self.blocks(n) for n in names] if self.native else [None]
        if (
            all(parts)
            and len({qtype for qtype, _ in parts}) > 1
            and all(
                qtype == "Q8_0" or self.tensors[n].tensor_type in REPACKED_AS_Q8_0
                for n, (qtype, _) in zip(names, parts)
            )
        ):
            parts = [self.blocks(n, to_q8_0=True) for n in names]
        if not all(parts):
            self.dequantized.update(
                self.tensors[n].tensor_type.name for n in names if self.tensors[n].tensor_type not in PLAIN
            )
            weight = torch.cat([self.dense(n) for n in names])
            self.release(names)
            return weight, bias
        for n, (qtype, _) in zip(names, parts):
            (self.kept if qtype == self.tensors[n].tensor_type.name else self.repacked)[
                self.tensors[n].tensor_type.name
            ] += 1
        k = int(self.tensors[names[0]].shape[0])
        if len({qtype for qtype, _ in parts}) == 1:
            blocks = parts[0][1] if len(parts) == 1 else np.concatenate([b for _, b in parts])
            mapped = blocks is self.tensors[names[0]].data
            if not mapped:
                self.release(names)
            weight = QuantWeight(parts[0][0], torch.from_numpy(blocks), k, blocks.shape[0], mapped=mapped)
            return QuantLinear(weight, bias, scratch)
        self.release([n for n, (_, b) in zip(names, parts) if b is not self.tensors[n].data])
        return Concat(
            [
                QuantLinear(
                    QuantWeight(
                        qtype,
                        torch.from_numpy(np.ascontiguousarray(b)),
                        k,
                        b.shape[0],
                        mapped=b is self.tensors[names[i]].data,
                    ),
                    biases[i] if biases else None,
                    scratch,
                )
                for i, (qtype, b) in enumerate(parts)
            ]
        )

    def release(self, names: list[str]) -> None:
        """Drop the mapped pages of tensors the model now holds a copy of (fused, reordered,
        rewritten or de-quantized) from this process's memory, so the file's bytes are not
        counted twice; an untouched private page is read from the file again if ever needed."""
        for name in names:
            drop_pages(self.tensors[name].data.ctypes.data, int(self.tensors[name].n_bytes))

    def notice(self, path: Path) -> None:
        if self.native and self.dequantized:
            log.warning(
                "%s: no native kernels for %s: de-quantized at load",
                path.name,
                ", ".join(f"{t} ({n} tensors)" for t, n in sorted(self.dequantized.items())),
            )
        if self.repacked:
            log.info(
                "%s: %s rewritten as Q8_0 without loss",
                path.name,
                ", ".join(f"{t} ({n} tensors)" for t, n in sorted(self.repacked.items())),
            )


def _llama_row_order(args: ModelArgs) -> dict[str, np.ndarray]:
    """llama.cpp's converter permutes the rows of Llama's Q and K (for its RoPE layout); the rows
    that undo it, per tensor (as transformers' GGUF loader does)."""
    if args.architecture != "LlamaForCausalLM":
        return {}

    def order(rows: int, heads: int) -> np.ndarray:
        return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(2, 1).reshape(rows)

    q, k = (
        order(args.num_heads * args.head_dim, args.num_heads),
        order(args.num_kv_heads * args.head_dim, args.num_kv_heads),
    )
    return {
        f"blk.{i}.attn_{n}.{kind}": o
        for i in range(args.num_layers)
        for n, o in (("q", q), ("k", k))
        for kind in ("weight", "bias")
    }


def load_gguf(model: CausalLM, path: Path, native: bool) -> None:
    """Load ``path``'s tensors into ``model`` (checked first: BadGGUF names a bad tensor);
    ``native`` keeps quantized blocks, else every weight is de-quantized to the model's dtype."""
    args = model.args
    reader = open_gguf(path)
    tensors = check_tensors(reader, args, path)
    source = _Source(tensors, _llama_row_order(args), native, Counter(), Counter(), Counter())
    scratch = Scratch()
    model.norm.copy_(source.dense("output_norm.weight"))
    head = (
        "output.weight"
        if "output.weight" in tensors and not args.tie_word_embeddings
        else "token_embd.weight"
    )
    _set(model, "lm_head", source.linear([head], None, scratch))
    embed = tensors["token_embd.weight"]
    if native:
        model.embed = QuantEmbedding(embed.tensor_type, embed.data, args.hidden_size, model.act_dtype)
    else:
        model.embed.weight.copy_(source.dense("token_embd.weight"))
        source.release(["token_embd.weight"])
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        layer.input_norm.copy_(source.dense(p + "attn_norm.weight"))
        layer.post_attention_norm.copy_(source.dense(p + "ffn_norm.weight"))
        biases = [p + f"attn_{n}.bias" for n in "qkv"] if args.qkv_bias else None
        _set(layer, "qkv", source.linear([p + f"attn_{n}.weight" for n in "qkv"], biases, scratch))
        _set(layer, "o_proj", source.linear([p + "attn_output.weight"], None, scratch))
        _set(layer, "gate_up", source.linear([p + "ffn_gate.weight", p + "ffn_up.weight"], None, scratch))
        _set(layer, "down", source.linear([p + "ffn_down.weight"], None, scratch))
    source.notice(path)


class Concat(torch.nn.Module):
    """Quantized parts of one fused product whose blocks differ in type: their outputs side by side."""

    def __init__(self, parts: list[QuantLinear]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


def _set(
    owner: torch.nn.Module, name: str, made: torch.nn.Module | tuple[torch.Tensor, torch.Tensor | None]
) -> None:
    if isinstance(made, torch.nn.Module):
        setattr(owner, name, made)
    else:
        getattr(owner, name).set(*made)
