"""A GGUF whose quantized tensors are stored de-quantized and rounded to bf16: the very weights
the embedded engine runs (it de-quantizes the same file to bf16), so that llama.cpp's server and
Conveyor's engine serve the same model in the remote-backend benchmark.

    python -m tests.backends.gguf_bf16 SOURCE.gguf TARGET.gguf [bf16|f16]

`f16` stores the same bf16-rounded values as F16 (exact for weights above 6e-5 in magnitude,
f16's smallest normal number): llama.cpp multiplies F16 much faster than BF16 on CPUs without
native bf16 instructions (prefill 35 tok/s in BF16 on one AVX2 core here).

Metadata (tokenizer, chat template, hyper-parameters) is copied; F32/F16/BF16 tensors are kept
as they are. The target is written beside itself under a temporary name, then renamed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from rich.progress import track


def convert(source: Path, target: Path, dtype: str = "bf16") -> None:
    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    try:
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            if f.name == gguf.Keys.General.FILE_TYPE:
                writer.add_file_type(
                    gguf.LlamaFileType.MOSTLY_BF16 if dtype == "bf16" else gguf.LlamaFileType.MOSTLY_F16
                )
                continue
            sub_type = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), f.types[0], sub_type=sub_type)
        for t in track(reader.tensors, description=f"de-quantizing to {dtype}"):
            if t.tensor_type in (Q.F32, Q.F16, Q.BF16):
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            else:
                rounded = gguf.quants.quantize(gguf.quants.dequantize(t.data, t.tensor_type), Q.BF16)
                if dtype == "bf16":
                    writer.add_tensor(t.name, rounded, raw_dtype=Q.BF16)
                else:
                    values = (rounded.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                    writer.add_tensor(t.name, values.astype(np.float16), raw_dtype=Q.F16)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])
