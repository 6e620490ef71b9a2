"""De-quantize a GGUF checkpoint with transformers into bf16 safetensors and tokenizer files
beside it, or (native weights) only check it and write its config and tokenizer files beside it;
the loader decides where, and makes the directory appear atomically."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from conveyor.engine.model.architectures import GGUF_ARCHITECTURES
from conveyor.engine.model.errors import UnsupportedGGUF

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def gguf_architecture(gguf: Path) -> str:
    """The HF architecture for a GGUF file, from its header alone."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    try:
        metadata, _ = read_gguf_metadata(str(gguf))
    except (OSError, ValueError) as error:
        raise UnsupportedGGUF(f"cannot read {gguf.resolve()} as GGUF: {error}") from error
    name = metadata.get("general.architecture")
    if name not in GGUF_ARCHITECTURES:
        supported = ", ".join(f"{hf} ({g})" for g, hf in GGUF_ARCHITECTURES.items())
        raise UnsupportedGGUF(f"unsupported architecture {name} in {gguf.resolve()}; supported: {supported}")
    return GGUF_ARCHITECTURES[name]


def convert_gguf(gguf: Path, progress: bool, console: Console) -> None:
    """Write bf16 safetensors, config and tokenizer files beside `gguf`, then delete it."""
    from conveyor.engine.model.gguf_check import open_gguf

    build_dir = gguf.parent
    open_gguf(gguf)  # a tensor outside the file or overlapping another: refused, named
    architecture = gguf_architecture(gguf)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _steps(progress, f"converting {architecture}", console) as step, _quiet_transformers():
        step("reading GGUF and de-quantizing (slow)")
        model = AutoModelForCausalLM.from_pretrained(build_dir, gguf_file=str(gguf), dtype=torch.bfloat16)
        _drop_quantization_markers(model)
        step("writing model.safetensors")
        model.save_pretrained(build_dir)
        del model
        step("converting tokenizer")
        AutoTokenizer.from_pretrained(build_dir, gguf_file=str(gguf)).save_pretrained(build_dir)
    gguf.unlink()


def prepare_native(gguf: Path, progress: bool, console: Console) -> None:
    """Check every tensor of `gguf` against its header and write the config, generation config and
    tokenizer files beside it (no de-quantizing: the engine loads the blocks, gguf_weights.py)."""
    from conveyor.engine.model.gguf_check import check_tensors, open_gguf
    from conveyor.engine.model.llama import ModelArgs

    build_dir = gguf.parent
    with _steps(progress, "preparing GGUF", console) as step, _quiet_transformers():
        step("checking tensors")
        reader = open_gguf(gguf)
        architecture = gguf_architecture(gguf)
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        config = AutoConfig.from_pretrained(build_dir, gguf_file=str(gguf))
        config.architectures = [architecture]
        check_tensors(reader, ModelArgs.from_hf_config(config.to_dict()), gguf)
        config.save_pretrained(build_dir)
        GenerationConfig.from_model_config(config).save_pretrained(build_dir)
        step("converting tokenizer")
        AutoTokenizer.from_pretrained(build_dir, gguf_file=str(gguf)).save_pretrained(build_dir)


def _drop_quantization_markers(model: PreTrainedModel) -> None:
    """Let ``save_pretrained`` write a GGUF-loaded model; its tensors are already plain bf16."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextmanager
def _steps(enabled: bool, title: str, console: Console) -> Iterator[Callable[[str], None]]:
    """A spinner with elapsed time; the yielded function names the current step."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not enabled) as bar:
        task = bar.add_task(title, total=None)
        yield lambda step: bar.update(task, description=f"{title}: {step}")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars while our own progress shows."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging

    verbosity, bars_were_on, tqdm = (
        logging.get_verbosity(),
        logging.is_progress_bar_enabled(),
        gguf_utils.tqdm,
    )
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    # The GGUF loader calls tqdm directly, past transformers' own progress-bar switch.
    gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = tqdm
        logging.set_verbosity(verbosity)
        if bars_were_on:
            logging.enable_progress_bar()
