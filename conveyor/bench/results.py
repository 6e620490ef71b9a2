"""Benchmark result files, written atomically: a temp file beside the target, then a rename,
so an interrupted run never leaves a half-written JSON, table or plot where a reader expects a
result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _temp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_suffix(path.suffix + ".tmp")


def write_text(path: Path, text: str) -> None:
    tmp = _temp(path)
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data: Any, indent: int = 1) -> None:
    write_text(path, json.dumps(data, indent=indent) + "\n")


def save_figure(fig: Any, path: Path, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure (its format from ``path``'s suffix) and release it."""
    import matplotlib.pyplot as plt

    tmp = _temp(path)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip("."), **savefig_kwargs)
    finally:
        plt.close(fig)
    tmp.replace(path)


_ISA_PREFIXES = ("avx", "amx", "fma", "sse4", "f16c", "bmi", "vnni", "sha_ni", "vaes", "vpclmul")


def machine_info() -> dict[str, Any]:
    """The CPU model, its SIMD instruction sets (from /proc/cpuinfo where there is one) and
    the cores this process may use, for the results files."""
    import os
    import platform

    model, family, flags = platform.processor() or platform.machine(), "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() in ("cpu family", "model"):
                family += f"{key.strip()} {value.strip()}, "  # the model name alone may be just "AMD EPYC"
            elif key.strip() == "flags":
                flags = sorted(f for f in value.split() if f.startswith(_ISA_PREFIXES))
                break
    except OSError:
        pass  # not Linux: the platform's own description
    return {
        "cpu_model": f"{model} ({family.rstrip(', ')})" if family else model,
        "instruction_sets": flags,
        "num_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def command_line() -> str:
    """The command that is running, as a shell line (`conveyor ...` for the CLI, whether it was
    started as the script or as `python -m conveyor.cli`)."""
    import shlex
    import sys

    program = "conveyor" if Path(sys.argv[0]).name in ("conveyor", "cli.py") else sys.argv[0]
    return shlex.join([program, *sys.argv[1:]])


def provenance() -> dict[str, Any]:
    """What a results file records about its own making: the command line, the machine, the
    date (UTC) and the load averages when it was written."""
    import os
    import time

    return {
        "command": command_line(),
        "machine": machine_info(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
