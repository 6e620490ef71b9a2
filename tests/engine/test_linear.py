"""Linear paths: every one this CPU has computes the same product; the per-shape choice is measured,
cached, forced by the flag, and never lands on a kernel that fails its self-check."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conveyor.config import ModelConfig
from conveyor.engine.model import kernel_choice, kernels, paths
from conveyor.engine.model.kernel_choice import choose_kernels
from conveyor.engine.model.linear import BUCKETS, Linear, bucket_of
from conveyor.engine.model.paths import PATHS, why_not


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())


def layer_of(dtype: torch.dtype, out_features: int = 72, in_features: int = 64, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    layer = Linear(out_features, in_features, dtype, bias=True)
    layer.set(torch.randn(out_features, in_features), torch.randn(out_features))
    return layer


def skip_unless_runs(path: str, dtype: torch.dtype, in_features: int = 64) -> None:
    if reason := why_not(path, dtype, in_features):
        pytest.skip(reason)  # names the missing instruction set where that is the reason


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_path_matches_fp32_reference(path: str, dtype: torch.dtype) -> None:
    skip_unless_runs(path, dtype)
    layer = layer_of(dtype)
    layer.use([path] * len(BUCKETS))
    for rows in [0, 1, 3, 8, 12, 16, 17, 33, 40, 100]:  # 17, 33, 100: padded for oneDNN
        x = torch.randn(rows, 64)  # fp32 activations, as the model's residual stream on CPU
        got = layer(x)
        assert got.dtype == torch.float32 and got.shape == (rows, 72)
        if rows:  # 0: a step whose chunks all stop mid-prompt samples no row
            want = reference(x, layer.weight, layer.bias)
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_onednn_sees_a_bounded_set_of_row_counts(monkeypatch) -> None:
    """oneDNN compiles and caches a primitive per input shape (~640 KB each here): every row
    count a server's steps produce must not be a new one (docs/results/soak_rss.md)."""
    skip_unless_runs("onednn", torch.bfloat16)
    padded = [paths.padded_rows(r) for r in range(1, 8193)]
    assert all(r <= p <= 1.125 * r for r, p in zip(range(1, 8193), padded))
    assert (
        len(set(padded)) == paths.EXACT_ROWS + 8 * 9
    )  # exact to 16, then 8 per doubling, (16, 32] to (4096, 8192]
    seen = []
    pointwise = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(
        torch.ops.mkldnn, "_linear_pointwise", lambda x, *a: seen.append(x.shape[0]) or pointwise(x, *a)
    )
    layer = layer_of(torch.bfloat16)
    layer.use(["onednn"] * len(BUCKETS))
    for rows in range(1, 513):
        assert layer(torch.randn(rows, 64)).shape == (rows, 72)
    assert len(seen) == 512 and len(set(seen)) == paths.EXACT_ROWS + 8 * 5


@pytest.mark.parametrize("kernel", list(kernels.KERNELS))
def test_kernel_is_exact_in_fp32_accumulation(kernel: str) -> None:
    skip_unless_runs(kernel, torch.bfloat16, 4864)
    gemv = getattr(kernels.gemv_module(), f"gemv_{kernel}")
    torch.manual_seed(0)
    w = torch.randn(130, 4864).bfloat16()  # 130: weight rows not a multiple of any tile
    for rows in [*range(1, 10), 12, 16, 17, 32, 33, 70]:  # one group of 8 rows, and several
        x = torch.randn(rows, 4864)
        got = gemv(x, w)
        assert got.dtype == torch.float32 and got.shape == (rows, 130)
        assert torch.allclose(got, reference(x, w, None), rtol=1e-4, atol=2e-3)
    with pytest.raises(RuntimeError, match="unsupported shape"):
        gemv(torch.randn(2, 4872), torch.randn(130, 4872).bfloat16())  # K not a multiple of 16


def test_buckets_cover_every_row_count() -> None:
    assert [bucket_of(r) for r in (1, 2, 4, 5, 8, 9, 16, 17, 32, 33, 512)] == [
        0,
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
        5,
        5,
    ]


@pytest.fixture
def choice_cache(tmp_path, monkeypatch):
    """An empty $CONVEYOR_CACHE for the choices (the kernels stay built in the real one)."""
    kernels.gemv_module()
    monkeypatch.setenv("CONVEYOR_CACHE", str(tmp_path))
    return tmp_path / "kernels"


def cached_files(cache_dir) -> list:
    return sorted(cache_dir.glob("choices-*.json"))


def test_choice_is_measured_once_then_read_from_the_cache(choice_cache, monkeypatch) -> None:
    layers = [layer_of(torch.bfloat16, seed=i) for i in range(3)]
    first = choose_kernels(layers)
    assert list(first) == ["bfloat16 72x64"] and set(first["bfloat16 72x64"]) == {
        label for label, _ in BUCKETS
    }
    for choice in first["bfloat16 72x64"].values():
        assert choice["ms"][choice["path"]] == min(choice["ms"].values())
    assert all(layer.plan == layers[0].plan for layer in layers)
    [file] = cached_files(choice_cache)
    assert json.loads(file.read_text())["key"]["threads"] == torch.get_num_threads()
    monkeypatch.setattr(kernel_choice, "_measure", lambda *a: pytest.fail("measured although cached"))
    assert choose_kernels([layer_of(torch.bfloat16)]) == first


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"key": {"format": 0}, "choices": {}}',
        '{"key": null, "choices": {"bfloat16 72x64": {"1": {"path": "nope"}}}}',
    ],
)
def test_corrupt_or_stale_cache_is_ignored_and_rewritten(choice_cache, content: str) -> None:
    choose_kernels([layer_of(torch.bfloat16)])
    [file] = cached_files(choice_cache)
    good = json.loads(file.read_text())
    file.write_text(content if "null" not in content else content.replace("null", json.dumps(good["key"])))
    choices = choose_kernels([layer_of(torch.bfloat16)])
    assert set(choices) == {"bfloat16 72x64"}
    rewritten = json.loads(file.read_text())
    assert rewritten["key"] == good["key"] and set(rewritten["choices"]["bfloat16 72x64"]) == set(
        choices["bfloat16 72x64"]
    )
    assert not list(choice_cache.glob(".choices-*"))  # no temporary file left behind


@pytest.mark.parametrize("path", PATHS)
def test_forced_path_is_used_for_every_bucket(choice_cache, path: str) -> None:
    skip_unless_runs(path, torch.bfloat16)
    layer = layer_of(torch.bfloat16)
    choose_kernels([layer], forced=path)
    assert layer.plan == [path] * len(BUCKETS)
    assert not cached_files(choice_cache)  # nothing measured, nothing cached


def test_forced_path_that_cannot_run_is_a_clear_error(choice_cache) -> None:
    with pytest.raises(ValueError, match="does not take float32 weights"):
        choose_kernels([layer_of(torch.float32)], forced="avx2")
    with pytest.raises(ValueError, match="linear_kernel must be one of"):
        ModelConfig(linear_kernel="fastest")


def test_kernel_failing_its_self_check_is_never_chosen(choice_cache, monkeypatch, caplog) -> None:
    broken = next((k for k in kernels.KERNELS if why_not(k, torch.bfloat16, 64) is None), None)
    if broken is None:
        pytest.skip("no kernel of ours runs on this CPU")
    real_make = paths.make
    monkeypatch.setattr(
        paths,
        "make",
        lambda path, w, b: (
            (lambda x: real_make(path, w, b)(x) * 1.01) if path == broken else real_make(path, w, b)
        ),
    )
    paths.self_check.cache_clear()
    try:
        assert "failed its self-check" in why_not(broken, torch.bfloat16, 64)
        with caplog.at_level(logging.WARNING, "conveyor.kernels"):
            choices = choose_kernels([layer_of(torch.bfloat16)])
        assert broken not in {c["path"] for c in choices["bfloat16 72x64"].values()}
        assert broken not in {p for c in choices["bfloat16 72x64"].values() for p in c["ms"]}
        assert f"linear kernel {broken} is not used" in caplog.text
        with pytest.raises(ValueError, match="failed its self-check"):
            choose_kernels([layer_of(torch.bfloat16)], forced=broken)
    finally:
        monkeypatch.undo()
        paths.self_check.cache_clear()


def test_kernel_build_failure_warns_and_falls_back_to_pytorch_paths(choice_cache, monkeypatch) -> None:
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    if all(kernels.missing_isa(k) for k in kernels.KERNELS):
        pytest.skip("this CPU has none of the kernels' instruction sets: nothing is built")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    kernels.gemv_module.cache_clear()
    paths.self_check.cache_clear()
    try:
        with pytest.warns(UserWarning, match="bf16 decode kernels unavailable.*no C\\+\\+ compiler"):
            assert kernels.gemv_module() is None
        layer = layer_of(torch.bfloat16)
        choices = choose_kernels([layer])
        assert {c["path"] for c in choices["bfloat16 72x64"].values()} <= {"onednn", "torch"}
        x = torch.randn(3, 64)
        want = reference(x, layer.weight, layer.bias)
        assert (layer(x) - want).abs().max() <= 1e-4 * want.abs().max()
    finally:
        monkeypatch.undo()
        kernels.gemv_module.cache_clear()
        paths.self_check.cache_clear()
