"""Turns a step's plan into tensors, runs the forward pass and samples.

Tokens are laid out decodes first (chunks of one token), then prefill chunks;
only rows that sample go through the final norm and the output layer.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from conveyor.config import CacheConfig, ModelConfig
from conveyor.core.step_plan import Chunk, SchedulerOutput, Swap
from conveyor.engine.model.attention import (
    AttentionMetadata,
    PrefillSegment,
    decode_mask,
    prefill_mask,
)
from conveyor.engine.model.kernel_choice import choose_kernels
from conveyor.engine.model.linear import Linear
from conveyor.engine.model.llama import GGUF_NAME, CausalLM, ModelArgs, activation_dtype
from conveyor.engine.model.qlinear import QuantLinear
from conveyor.engine.sampler import ModelLogprobs, Sampler

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


class ModelRunner:
    """Owns the model weights and the paged KV cache on one device."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, model_dir: Path) -> None:
        self.device = torch.device(model_config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
        if model_config.num_threads > 0:
            torch.set_num_threads(model_config.num_threads)
        self.dtype = resolve_dtype(model_config.dtype)
        self.args = ModelArgs.from_dir(model_dir)
        self.block_size = cache_config.block_size
        with torch.device(self.device):
            self.model = CausalLM(self.args, self.dtype, activation_dtype(self.dtype, self.device))
        if (Path(model_dir) / GGUF_NAME).is_file() and self.device.type != "cpu":
            raise ValueError("native GGUF weights run on CPU only; use --weights bf16 on CUDA")
        with torch.inference_mode():
            self.model.load(model_dir)
        layers = [m for m in self.model.modules() if isinstance(m, (Linear, QuantLinear))]
        self.linear_choices = choose_kernels(
            layers,
            self.model.act_dtype,
            model_config.linear_kernel,
            model_config.quant_kernel,
            model_config.quant_activations,
        )
        self.num_blocks = cache_config.num_blocks or self._blocks_for_memory(cache_config)
        a = self.args
        self.kv = torch.zeros(
            a.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            a.num_kv_heads,
            a.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.kv_caches = [(self.kv[i, 0], self.kv[i, 1]) for i in range(a.num_layers)]
        self.sampler = Sampler(self.device)
        self.num_threads = torch.get_num_threads()

    def _block_bytes(self) -> int:
        a = self.args
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def _blocks_for_memory(self, cache_config: CacheConfig) -> int:
        """On CPU, ``--kv-cache-mb``; on CUDA, what the weights leave of ``--gpu-memory-utilization``
        of the device's memory (the rest stays free for activations and other processes)."""
        if self.device.type != "cuda":
            return max(1, cache_config.kv_cache_mb * 2**20 // self._block_bytes())
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free - (1 - cache_config.gpu_memory_utilization) * total
        if budget < self._block_bytes():
            raise ValueError(
                f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free of "
                f"{total / 2**30:.1f}, at most {cache_config.gpu_memory_utilization:.0%} to be used"
            )
        return int(budget // self._block_bytes())

    def execute(self, out: SchedulerOutput) -> list[int | None]:
        """Run one step; returns the sampled token of each chunk (None where it did not sample)."""
        logits, order = self.forward(out)
        sampled_chunks = [i for i in order if out.chunks[i].sample]
        requests = [out.chunks[i].request for i in sampled_chunks]
        logprobs = ModelLogprobs(logits, [r.params.logprobs for r in requests])  # before masking
        tokens = self.sampler(
            logits,
            [r.params for r in requests],
            [len(r.output_token_ids) for r in requests],
            [r.constraint for r in requests],
            [r.output_token_ids for r in requests],
        )
        for row, entry in logprobs.of(tokens):
            requests[row].output_logprobs.append(entry)  # the scheduler appends the token itself
        result: list[int | None] = [None] * len(out.chunks)
        for i, token in zip(sampled_chunks, tokens):
            result[i] = token
        return result

    def reserve_cores(self, num_cores: int) -> None:
        """On CPU, run the next steps on `num_cores` threads fewer (at least one), e.g. for
        tool workers busy on this machine; 0 gives the forward pass all its threads back."""
        threads = max(1, self.num_threads - num_cores)
        if self.device.type == "cpu" and threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def forward(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        """Logits ``[sampling chunks, vocab]`` (float32) and the order the chunks ran in."""
        order = sorted(range(len(out.chunks)), key=lambda i: out.chunks[i].num_tokens > 1)
        chunks = [out.chunks[i] for i in order]
        decodes = [c for c in chunks if c.num_tokens == 1]
        width = max((len(c.request.block_table) for c in decodes), default=0)
        tables = [c.request.block_table + [0] * (width - len(c.request.block_table)) for c in decodes]
        prefill_tables = [c.request.block_table for c in chunks[len(decodes) :]]
        tensors = self._upload(
            [
                *self._flatten(chunks),
                [b for t in tables for b in t],
                [c.start + 1 for c in decodes],
                *prefill_tables,
            ]
        )
        input_ids, positions, slots, logit_rows, flat_tables, lens = tensors[:6]
        meta = AttentionMetadata(slot_mapping=slots)
        if decodes:
            meta.num_decodes = len(decodes)
            meta.decode_block_tables = flat_tables.view(len(decodes), width)
            meta.decode_mask = decode_mask(lens, width * self.block_size, self.dtype)
        self._add_prefills(meta, chunks[len(decodes) :], tensors[6:])
        return self.model(input_ids, positions, meta, self.kv_caches, logit_rows), order

    def _upload(self, lists: list[list[int]]) -> list[torch.Tensor]:
        """The step's index lists as one host tensor and, on CUDA, one pinned copy to the device;
        returns a view per list."""
        flat = torch.tensor(list(itertools.chain.from_iterable(lists)), dtype=torch.long)
        if self.device.type == "cuda":
            flat = flat.pin_memory().to(self.device, non_blocking=True)
        return list(flat.split([len(xs) for xs in lists]))

    def _flatten(self, chunks: list[Chunk]) -> tuple[list[int], ...]:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        bs = self.block_size
        for c in chunks:
            table = c.request.block_table
            span = range(c.start, c.start + c.num_tokens)
            ids.extend(c.request.token_ids[c.start : c.start + c.num_tokens])
            positions.extend(span)
            slots.extend(table[p // bs] * bs + p % bs for p in span)
            if c.sample:
                logit_rows.append(len(ids) - 1)
        return ids, positions, slots, logit_rows

    def _add_prefills(
        self, meta: AttentionMetadata, prefills: list[Chunk], tables: list[torch.Tensor]
    ) -> None:
        group = self.args.num_heads // self.args.num_kv_heads
        row = meta.num_decodes
        for c, table in zip(prefills, tables):
            mask = prefill_mask(c.start, c.num_tokens, group, self.device, self.dtype) if c.start else None
            meta.prefills.append(PrefillSegment(row, c.num_tokens, c.start, table, mask))
            row += c.num_tokens

    # ---- the host pool: KV of requests waiting on tools, swapped out (core/intercept.py) ----
    def init_host_pool(self, cache_config: CacheConfig) -> int:
        """Allocate the host-memory block pool (same layout as ``self.kv``); its block count. Left
        uninitialised (no memory is touched until a block is swapped out: every block is written
        before it is read)."""
        a = self.args
        num = cache_config.num_host_blocks or cache_config.swap_space_mb * 2**20 // self._block_bytes()
        self.host_kv = torch.empty(
            a.num_layers,
            2,
            num,
            self.block_size,
            a.num_kv_heads,
            a.head_dim,
            dtype=self.dtype,
            pin_memory=self.device.type == "cuda",
        )
        return num

    @torch.inference_mode()
    def swap(self, swaps: list[Swap]) -> None:
        """Copy blocks between the pools, in order (a block freed by one copy may be the target of
        a later one): all layers, K and V, in one gather and one scatter per copy. On CUDA a copy
        to the host waits for the device before the host scatter reads it; a copy to the device
        goes from a pinned gather without waiting, and the step's kernels queue behind it."""
        for s in swaps:
            src, dst = (self.kv, self.host_kv) if s.to_host else (self.host_kv, self.kv)
            src_ids = torch.tensor([p[0] for p in s.pairs], dtype=torch.long).to(src.device)
            dst_ids = torch.tensor([p[1] for p in s.pairs], dtype=torch.long).to(dst.device)
            gathered = src.index_select(2, src_ids)
            if s.to_host:
                gathered = gathered.cpu()  # blocking: the device's copy is done before the read
            elif self.device.type == "cuda":
                gathered = gathered.pin_memory().to(dst.device, non_blocking=True)
            dst.index_copy_(2, dst_ids, gathered)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_block_copy(self, num_blocks: int = 8, repeats: int = 3) -> float:
        """Seconds to copy one block one way (out and back, timed at start-up, best of ``repeats``)."""
        n = min(num_blocks, self.num_blocks, self.host_kv.shape[2])
        if n == 0:
            return 0.0
        pairs = [(i, i) for i in range(n)]
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.swap([Swap(True, pairs), Swap(False, pairs)])
            best = min(best, time.perf_counter() - start)
        return best / (2 * n)
