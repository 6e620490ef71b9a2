"""Bad GGUF files (crafted from a tiny good one) are refused at load with one message naming the
tensor, and leave nothing in the model cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, ReaderTensor

from conveyor.engine.model.loader import ModelLoadError, resolve_model
from tests.gguf_tiny import private_model_cache, write_tiny_gguf


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("good") / "tiny.gguf", "qwen2")


def patched(good: Path, tmp: Path, name: str, edit: Callable[[ReaderTensor], None]) -> Path:
    """A copy of ``good`` with the header entry of tensor ``name`` edited in place."""
    path = tmp / "bad.gguf"
    path.write_bytes(good.read_bytes())
    reader = GGUFReader(path, "r+")
    edit(next(t for t in reader.tensors if t.name == name))
    reader.data.flush()
    del reader
    return path


def set_dims(*dims: int) -> Callable[[ReaderTensor], None]:
    def edit(t: ReaderTensor) -> None:
        t.field.parts[3][:] = dims

    return edit


def set_type(type_id: int) -> Callable[[ReaderTensor], None]:
    def edit(t: ReaderTensor) -> None:
        t.field.parts[4][:] = type_id

    return edit


def rename(t: ReaderTensor) -> None:
    t.field.parts[1][:] = np.frombuffer(t.name.replace("up", "uq").encode(), np.uint8)


def refused(path: Path, cache: Path, *needles: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        resolve_model(str(path), weights="native", progress=False)
    message = str(info.value)
    assert all(n in message for n in needles), message
    assert list((cache / "models").iterdir()) == [], "a bad file left something in the cache"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = private_model_cache(tmp_path)
    monkeypatch.setenv("CONVEYOR_CACHE", str(root))
    return root


def test_a_good_file_is_accepted(good: Path, cache: Path) -> None:
    assert (resolve_model(str(good), weights="native", progress=False) / "model.gguf").is_file()


def test_truncated_file_names_the_tensor_cut_off(good: Path, tmp_path: Path, cache: Path) -> None:
    last = max(GGUFReader(good).tensors, key=lambda t: t.data_offset).name
    path = tmp_path / "cut.gguf"
    path.write_bytes(good.read_bytes()[:-100])
    refused(path, cache, f"tensor {last}", "run past the end of the file")


@pytest.mark.parametrize("weights", ["native", "bf16"])
def test_truncated_file_refused_for_either_weights(
    good: Path, tmp_path: Path, cache: Path, weights: str
) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ModelLoadError, match="tensor .* run past the end of the file"):
        resolve_model(str(path), weights=weights, progress=False)
    assert list((cache / "models").iterdir()) == []


def test_shape_unlike_the_header_names_the_tensor(good: Path, tmp_path: Path, cache: Path) -> None:
    path = patched(good, tmp_path, "blk.1.ffn_down.weight", set_dims(256, 256))
    refused(path, cache, "tensor blk.1.ffn_down.weight has shape [256, 256]", "needs [256, 512]")


def test_more_blocks_than_its_data_names_the_tensor(good: Path, tmp_path: Path, cache: Path) -> None:
    path = patched(good, tmp_path, "blk.0.attn_q.weight", set_dims(256, 512))
    refused(path, cache, "tensor blk.0.attn_q.weight", "overlap")


def test_type_unlike_its_data_names_the_tensor(good: Path, tmp_path: Path, cache: Path) -> None:
    path = patched(good, tmp_path, "blk.0.ffn_down.weight", set_type(8))  # Q6_K said to be Q8_0: more bytes
    refused(path, cache, "tensor blk.0.ffn_down.weight", "overlap")


def test_unknown_type_names_the_tensor(good: Path, tmp_path: Path, cache: Path) -> None:
    path = patched(good, tmp_path, "blk.1.attn_v.weight", set_type(250))
    refused(path, cache, "tensor blk.1.attn_v.weight: unknown GGML type id 250")


def test_rows_not_whole_blocks_names_the_tensor(good: Path, tmp_path: Path, cache: Path) -> None:
    path = patched(good, tmp_path, "blk.0.attn_k.weight", set_dims(250, 128))
    refused(
        path, cache, "tensor blk.0.attn_k.weight: its rows of 250 elements are not whole Q5_0 blocks of 32"
    )


def test_missing_tensor_is_named(good: Path, tmp_path: Path, cache: Path) -> None:
    path = patched(good, tmp_path, "blk.1.ffn_up.weight", rename)
    refused(path, cache, "tensor blk.1.ffn_up.weight is missing")
