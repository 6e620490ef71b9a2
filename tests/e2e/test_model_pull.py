"""Convert the real SmolLM2 GGUF into a fresh cache and load it with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conveyor.engine.model import loader
from conveyor.engine.model.loader import resolve_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONVEYOR_CACHE", str(cache))
        return cache, resolve_model("smollm2-135m", progress=False)


def test_layout_and_no_leftovers(converted: tuple[Path, Path]) -> None:
    cache, path = converted
    assert path.parent == cache / "models" and path.name.startswith("smollm2-135m-")
    assert [p.name for p in (cache / "models").iterdir()] == [path.name]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith(".gguf") for name in names)


def test_tensors_are_bf16_with_hf_names(converted: tuple[Path, Path]) -> None:
    with safe_open(str(converted[1] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.weight" in names and "model.embed_tokens.weight" in names
        assert {f.get_tensor(name).dtype for name in names} == {torch.bfloat16}


def test_loads_with_transformers(converted: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(converted[1], dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(converted[1])
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])


def test_second_call_is_fast(converted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The second call finds the cache: no install, no hashing, no conversion (counted, not timed)."""
    cache, path = converted
    monkeypatch.setenv("CONVEYOR_CACHE", str(cache))
    calls: list[str] = []
    for name in ("_install", "_hash_files", "_convert_gguf", "_convert_local_gguf"):
        monkeypatch.setattr(loader, name, lambda *a, _name=name, **k: calls.append(_name))
    assert resolve_model("smollm2-135m") == path
    assert calls == []
