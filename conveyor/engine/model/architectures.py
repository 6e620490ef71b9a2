"""The model architectures the engine runs, in one table: Hugging Face name -> GGUF name
(`llama.py` builds them, `loader.py` accepts their checkpoints, `gguf.py` their GGUF files)."""

from __future__ import annotations

ARCHITECTURES: dict[str, str] = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
GGUF_ARCHITECTURES: dict[str, str] = {gguf: hf for hf, gguf in ARCHITECTURES.items()}
