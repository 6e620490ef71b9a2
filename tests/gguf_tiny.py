"""Tiny random GGUF models (Llama and Qwen2 shapes) written with gguf.GGUFWriter, their tensors in
a mix of the GGUF types a real file holds, with the byte-level tokenizer of tests/tiny.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf import quants as gguf_quants

from conveyor.config import cache_root
from tests.tiny import CHAT_TEMPLATE, byte_tokenizer

T = GGMLQuantizationType
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
# Where each fp16 scale of a block lies (byte offset): set to sane values in random K-quant blocks.
SCALE_OFFSETS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q3_K: (108,)}
# tensor kind -> type, per layer; layer 0 mixes types inside Q/K/V (kept as separate parts),
# layer 1 has Q5_0 beside Q8_0 there (Q5_0 rewritten as Q8_0, fused); Q3_K has no kernel
# (de-quantized at load, with a notice)
LAYER_TYPES = [
    {
        "attn_q": T.Q4_K,
        "attn_k": T.Q5_0,
        "attn_v": T.Q8_0,
        "attn_output": T.Q4_1,
        "ffn_gate": T.Q5_K,
        "ffn_up": T.Q5_K,
        "ffn_down": T.Q6_K,
    },
    {
        "attn_q": T.Q5_0,
        "attn_k": T.Q8_0,
        "attn_v": T.Q8_0,
        "attn_output": T.Q3_K,
        "ffn_gate": T.Q4_0,
        "ffn_up": T.Q4_0,
        "ffn_down": T.Q4_K,
    },
]


def private_model_cache(tmp: Path) -> Path:
    """A cache root under ``tmp`` for models, sharing the real cache's compiled kernels and
    kernel choices (compiling them again per test would take minutes)."""
    kernels = cache_root() / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    root = tmp / "cache"
    root.mkdir()
    (root / "kernels").symlink_to(kernels)
    return root


def quantized(values: np.ndarray, qtype: T, rng: np.random.Generator) -> np.ndarray:
    """``values`` quantized to ``qtype`` by gguf where it can; K-quants: random blocks whose scales
    are set so the values have the same spread as ``values``."""
    if qtype not in SCALE_OFFSETS:
        return gguf_quants.quantize(values, qtype)
    elems, size = GGML_QUANT_SIZES[qtype]
    rows = values.shape[0]
    blocks = rng.integers(0, 256, (rows * values.shape[1] // elems, size), dtype=np.uint8)

    def with_scale(scale: float) -> np.ndarray:
        b = blocks.copy()
        for offset in SCALE_OFFSETS[qtype]:
            b[:, offset : offset + 2] = np.full((len(b), 1), scale, np.float16).view(np.uint8)
        return b.reshape(rows, -1)

    spread = gguf_quants.dequantize(with_scale(1.0), qtype).std()
    return with_scale(float(values.std() / spread))


def _llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes Llama's Q and K in."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add(writer: GGUFWriter, name: str, values: np.ndarray, qtype: T, rng: np.random.Generator) -> None:
    if qtype == T.F32:
        writer.add_tensor(name, values.astype(np.float32))
    else:
        data = quantized(values.astype(np.float32), qtype, rng)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


def _metadata(writer: GGUFWriter, arch: str, vocab: list[str], eos: int, pad: int) -> None:
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if arch == "llama":
        writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * (len(vocab) - 2) + [3, 3])
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_eos_token_id(eos)
    writer.add_bos_token_id(pad)
    writer.add_pad_token_id(pad)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def write_tiny_gguf(path: Path, arch: str, seed: int = 0) -> Path:
    """A random 2-layer ``arch`` ('llama' or 'qwen2') model as one GGUF file at ``path``.
    Llama has its own Q6_K output layer; Qwen2 ties it to its Q8_0 embedding and has Q/K/V biases."""
    rng = np.random.default_rng(seed)
    tokenizer = byte_tokenizer()
    vocab = [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    writer = GGUFWriter(str(path), arch)
    _metadata(writer, arch, vocab, tokenizer.eos_token_id, tokenizer.pad_token_id)

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.5, shape)

    _add(writer, "token_embd.weight", w(len(vocab), HIDDEN), T.Q5_0 if arch == "llama" else T.Q8_0, rng)
    if arch == "llama":
        _add(writer, "output.weight", w(len(vocab), HIDDEN), T.Q6_K, rng)
    _add(writer, "output_norm.weight", 1 + 0.1 * w(HIDDEN), T.F32, rng)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for i, types in enumerate(LAYER_TYPES):
        p = f"blk.{i}."
        wq, wk = w(q, HIDDEN), w(kv, HIDDEN)
        if arch == "llama":
            wq, wk = _llama_permute(wq, HEADS), _llama_permute(wk, KV_HEADS)
        shapes = {
            "attn_q": wq,
            "attn_k": wk,
            "attn_v": w(kv, HIDDEN),
            "attn_output": w(HIDDEN, q),
            "ffn_gate": w(INTER, HIDDEN),
            "ffn_up": w(INTER, HIDDEN),
            "ffn_down": w(HIDDEN, INTER),
        }
        for kind, values in shapes.items():
            _add(writer, p + kind + ".weight", values, types[kind], rng)
        if arch == "qwen2":
            for kind, size in (("attn_q", q), ("attn_k", kv), ("attn_v", kv)):
                _add(writer, p + kind + ".bias", 0.1 * w(size), T.F32, rng)
        _add(writer, p + "attn_norm.weight", 1 + 0.1 * w(HIDDEN), T.F32, rng)
        _add(writer, p + "ffn_norm.weight", 1 + 0.1 * w(HIDDEN), T.F32, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
