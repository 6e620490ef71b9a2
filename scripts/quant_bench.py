"""Micro-benchmark of the quantized-weight kernels (conveyor/engine/model/quant.py).

For each weight shape of the default model (Qwen2.5-Coder-0.5B Q4_K_M) and each kernel that runs
here, the GB/s of quantized weight bytes read per product, at 1, 8 and 32 activation rows; the bf16
kernel chosen for bf16 weights, the streaming-read ceiling, and de-quantization to fp32 and bf16 in
the same run. Weights are several copies of the shape (at least --bytes in all), visited in turn, so
that they come from memory as in a decode step.

    PYTHONPATH=$PWD python scripts/quant_bench.py [--rows 1,8,32] [--bytes 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from conveyor.engine.model import kernels, quant

# (rows N, columns K, type, what it is in the default model)
SHAPES = (
    (896, 896, "Q5_0", "attn q/o"),
    (128, 896, "Q8_0", "attn v"),
    (128, 896, "Q5_0", "attn k"),
    (4864, 896, "Q5_0", "ffn gate/up"),
    (896, 4864, "Q4_K", "ffn down"),
    (896, 4864, "Q6_K", "ffn down"),
    (151936, 896, "Q8_0", "output"),
)
FP16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def random_weight(qtype: str, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """Random blocks with finite, trained-model-sized fp16 scales (speed does not depend on values)."""
    t = quant.QUANT_TYPES[qtype]
    raw = rng.integers(0, 256, (n * k // t.block_elems, t.block_bytes), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        raw[:, offset : offset + 2] = (
            rng.uniform(1e-4, 2e-3, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
        )
    return torch.from_numpy(raw.reshape(n, -1))


def best_s(fn, copies: list, min_s: float = 0.3) -> float:
    """Seconds of the fastest single call, over at least two passes over all copies (about min_s in
    all). Per call, not per pass: on a shared 2-core machine a call whose second thread is not
    scheduled waits a time slice, and a pass's mean would mostly measure those waits."""
    fn(copies[0])
    best, spent, passes = float("inf"), 0.0, 0
    while passes < 2 or spent < min_s:
        for c in copies:
            start = time.perf_counter()
            fn(c)
            t = time.perf_counter() - start
            best, spent = min(best, t), spent + t
        passes += 1
    return best


def read_ceiling_gbs(nbytes: int = 512 * 2**20) -> float:
    data = torch.ones(nbytes // 4)
    return nbytes / best_s(lambda t: t.sum(), [data]) / 1e9


def bench_shape(n: int, k: int, qtype: str, rows: list[int], total_bytes: int, rng) -> list[str]:
    one = random_weight(qtype, n, k, rng)
    copies = [one] + [one.clone() for _ in range(max(0, -(-total_bytes // one.numel()) - 1))]
    lines = []
    for kernel in quant.QKERNELS:
        if reason := quant.qkernel_why_not(kernel, qtype):
            lines.append(f"  {kernel}: skipped ({reason})")
            continue
        gbs = []
        for m in rows:
            x = torch.randn(m, k)
            gbs.append(
                one.numel()
                / best_s(lambda w, x=x, kernel=kernel: quant.qmatmul(x, w, qtype, kernel), copies)
                / 1e9
            )
        lines.append(f"  {kernel:14s} " + "  ".join(f"M={m:<2d} {g:6.1f} GB/s" for m, g in zip(rows, gbs)))
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(n, k, dtype=dtype)
        s = best_s(lambda w, out=out: quant.dequantize(w, qtype, out), copies)
        lines.append(
            f"  dequantize->{str(dtype).removeprefix('torch.'):8s} {one.numel() / s / 1e9:6.1f} GB/s read, "
            f"{out.numel() * out.element_size() / s / 1e9:6.1f} GB/s written"
        )
    return lines


def bench_bf16(n: int, k: int, rows: list[int], total_bytes: int) -> str:
    """The bf16 weight path the engine uses today, for comparison (its bytes: 2 per weight)."""
    gemv = kernels.gemv_module()
    name = next((p for p in ("avx512bf16", "avx512", "avx2") if not kernels.missing_isa(p)), None)
    if gemv is None or name is None:
        return "  bf16: no kernel here"
    one = torch.randn(n, k).bfloat16()
    copies = [one] + [one.clone() for _ in range(max(0, -(-total_bytes // (one.numel() * 2)) - 1))]
    fn = getattr(gemv, f"gemv_{name}")
    parts = []
    for m in rows:
        x = torch.randn(m, k)
        parts.append(f"M={m:<2d} {one.numel() * 2 / best_s(lambda w, x=x: fn(x, w), copies) / 1e9:6.1f} GB/s")
    return f"  bf16 {name:9s} " + "  ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--bytes", type=int, default=128, help="MiB of weight copies per shape")
    parser.add_argument("--shapes", default="", help="indices into SHAPES, comma-separated (default all)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    picked = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    rng = np.random.default_rng(0)
    print(
        f"CPU: {kernels.cpu_model()}; {torch.get_num_threads()} threads; load average "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(f"streaming read (torch sum of 512 MiB fp32): {read_ceiling_gbs():.1f} GB/s")
    with torch.inference_mode():
        for n, k, qtype, what in picked:
            print(f"{n}x{k} {qtype} ({what}), {n * quant.row_bytes(qtype, k) / 2**20:.2f} MiB")
            for line in bench_shape(n, k, qtype, rows, args.bytes * 2**20, rng):
                print(line)
            print(bench_bf16(n, k, rows, args.bytes * 2**20))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
