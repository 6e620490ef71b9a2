"""The Llama and Qwen2 families in one screen of plain PyTorch, over a paged KV cache.

Differences between the two are data, not code: Qwen2 has biases on Q, K and V,
and either may tie the output layer to the token embeddings. Q, K and V are one
fused matrix, as are the gate and up projections, so a layer runs four matmuls.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from safetensors import safe_open

from conveyor.engine.model.architectures import ARCHITECTURES
from conveyor.engine.model.attention import AttentionMetadata, attend, paged_attention
from conveyor.engine.model.gguf_weights import load_gguf
from conveyor.engine.model.kernels import fused_module
from conveyor.engine.model.linear import Linear

GGUF_NAME = "model.gguf"  # a native model directory holds its GGUF under this name (loader.py)


@dataclass(frozen=True, slots=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_hf_config(cls, config: dict) -> ModelArgs:
        arch = (config.get("architectures") or ["?"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch}; supported: {', '.join(ARCHITECTURES)}")
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        heads = config["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelArgs:
        return cls.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies with the model's theta; Llama 3 scaling when the config asks for it."""
    inv = 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim)
    scaling = args.rope_scaling
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return inv.float()
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"unsupported rope scaling {scaling}")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``[tokens, heads, head_dim]`` with ``cos``/``sin`` of ``[tokens, 1, head_dim/2]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: ModuleType | None) -> torch.Tensor:
    if fused is not None:  # one op, not PyTorch's seven
        return fused.rms_norm(x.contiguous(), weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def activation_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the residual stream. One rule for every CPU: fp32, while weights and KV cache
    keep ``dtype``. A bf16 residual stream failed the bf16 exactness test on an AVX512_BF16 CPU
    (issue 20: error 0.71 against 0.52 allowed); the matmul paths that multiply in bf16 round
    their own input (``paths.py``), so only the products see bf16 activations."""
    if dtype in (torch.bfloat16, torch.float16) and device.type == "cpu":
        return torch.float32
    return dtype


def _vector(size: int, dtype: torch.dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(size, dtype=dtype), requires_grad=False)


class Layer(torch.nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype, act_dtype: torch.dtype) -> None:
        super().__init__()
        self.args = args
        q_size, kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.sizes = (q_size, kv_size, kv_size)
        self.input_norm = _vector(args.hidden_size, act_dtype)
        self.post_attention_norm = _vector(args.hidden_size, act_dtype)
        self.qkv = Linear(
            q_size + 2 * kv_size, args.hidden_size, dtype, bias=args.qkv_bias, bias_dtype=act_dtype
        )
        self.o_proj = Linear(args.hidden_size, q_size, dtype)
        self.gate_up = Linear(2 * args.intermediate_size, args.hidden_size, dtype)
        self.down = Linear(args.hidden_size, args.intermediate_size, dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        fused: ModuleType | None = None,
    ) -> torch.Tensor:
        """``cos``/``sin``: ``[tokens, head_dim / 2]``; ``fused``: the fused glue op's module, on CPU
        with fp32 activations."""
        a = self.args
        h = _rms_norm(x, self.input_norm, a.rms_norm_eps, fused)
        qkv = self.qkv(h)
        if fused is not None:  # the same steps in one op (kernels.fused_module)
            q, k, v = fused.rope_store_kv(
                qkv.contiguous(),
                cos,
                sin,
                kv[0],
                kv[1],
                meta.slot_mapping,
                a.num_heads,
                a.num_kv_heads,
                a.head_dim,
            )
            attn = attend(q, k, v, kv[0], kv[1], meta, a.head_dim**-0.5).to(x.dtype)
        else:
            q, k, v = qkv.split(self.sizes, dim=-1)
            q = apply_rope(q.view(-1, a.num_heads, a.head_dim), cos[:, None], sin[:, None])
            k = apply_rope(k.view(-1, a.num_kv_heads, a.head_dim), cos[:, None], sin[:, None])
            v = v.view(-1, a.num_kv_heads, a.head_dim)
            attn = paged_attention(q, k, v, kv[0], kv[1], meta, a.head_dim**-0.5)
        x = x + self.o_proj(attn)
        h = _rms_norm(x, self.post_attention_norm, a.rms_norm_eps, fused)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class CausalLM(torch.nn.Module):
    """Embeddings, layers, final norm and output layer; ``forward`` returns logits of chosen rows."""

    def __init__(self, args: ModelArgs, dtype: torch.dtype, act_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.args = args
        self.act_dtype = act_dtype or dtype
        self.embed: torch.nn.Module = Embedding(args.vocab_size, args.hidden_size, dtype)
        self.layers = torch.nn.ModuleList(Layer(args, dtype, self.act_dtype) for _ in range(args.num_layers))
        self.norm = _vector(args.hidden_size, self.act_dtype)
        self.lm_head = Linear(args.vocab_size, args.hidden_size, dtype)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        logit_rows: torch.Tensor,
    ) -> torch.Tensor:
        x = self.embed(input_ids).to(self.act_dtype)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        fused = fused_module() if x.device.type == "cpu" and x.dtype == torch.float32 else None
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv, meta, fused)
        x = _rms_norm(x[logit_rows], self.norm, self.args.rms_norm_eps, fused)
        return self.lm_head(x).float()

    def load(self, model_dir: Path, native: bool = True) -> None:
        """Copy the weights of ``model_dir`` into this model, fusing as we go: its HF-named
        safetensors, or its ``model.gguf`` (``native``: quantized blocks kept, see gguf_weights.py)."""
        if (Path(model_dir) / GGUF_NAME).is_file():
            return load_gguf(self, Path(model_dir) / GGUF_NAME, native)
        tensors = _read_safetensors(Path(model_dir))
        take = tensors.pop
        self.embed.weight.copy_(take("model.embed_tokens.weight"))
        self.norm.copy_(take("model.norm.weight"))
        head = tensors.pop("lm_head.weight", None)
        self.lm_head.set(self.embed.weight if head is None or self.args.tie_word_embeddings else head)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.input_norm.copy_(take(p + "input_layernorm.weight"))
            layer.post_attention_norm.copy_(take(p + "post_attention_layernorm.weight"))
            qkv = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            bias = [take(p + f"self_attn.{n}_proj.bias") for n in "qkv"] if self.args.qkv_bias else None
            layer.qkv.set(torch.cat(qkv), torch.cat(bias) if bias else None)
            layer.o_proj.set(take(p + "self_attn.o_proj.weight"))
            layer.gate_up.set(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
            layer.down.set(take(p + "mlp.down_proj.weight"))
        unused = [k for k in tensors if "rotary_emb" not in k]
        if unused:
            raise ValueError(f"unexpected weights in {model_dir}: {unused[:5]}")


class Embedding(torch.nn.Module):
    """Token embeddings as a plain matrix (a GGUF's stay quantized: ``qlinear.QuantEmbedding``)."""

    def __init__(self, num: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(num, dim, dtype=dtype), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is no dict)
                tensors[name] = f.get_tensor(name)
    return tensors
