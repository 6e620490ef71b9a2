"""Paged KV blocks: allocation, reference counts and hash-based prefix caching.

Pure Python. A block holds ``block_size`` token slots of every layer's KV. A full
block is registered under a hash of its tokens chained with the hash of the block
before it, so a later request whose prompt starts with the same tokens (the next
turn of a conversation, a request resumed after a tool result, a preempted request
recomputed) adopts the block instead of prefilling it again. Freed blocks keep
their hash and stay adoptable until allocation reuses them, oldest first.

A second pool of ``num_host_blocks`` blocks lives in host memory: ``swap_out`` moves a
request's blocks there and ``swap_in`` back; each returns the (from, to) block pairs that
the runner copies.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from conveyor.core.request import Request


def chain_hash(parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """sha256 of a block's tokens and its parent's hash: a collision would let one request
    read another's KV, so no cheap unkeyed hash."""
    return hashlib.sha256((parent or b"") + array("q", token_ids).tobytes()).digest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


class BlockManager:
    """Owns the block pool; requests hold block ids in their ``block_table``."""

    def __init__(
        self, num_blocks: int, block_size: int, prefix_caching: bool = True, num_host_blocks: int = 0
    ) -> None:
        if num_blocks <= 0 or block_size <= 0 or num_host_blocks < 0:
            raise ValueError("num_blocks and block_size must be positive, num_host_blocks >= 0")
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._by_hash: dict[bytes, int] = {}
        self.num_host_blocks = num_host_blocks
        self._host_free: list[int] = list(range(num_host_blocks - 1, -1, -1))

    # ---- counters -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self.blocks) - len(self._free)

    @property
    def num_free_host_blocks(self) -> int:
        return len(self._host_free)

    @property
    def num_cached_blocks(self) -> int:
        """Full blocks registered for prefix reuse (in use or free)."""
        return len(self._by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -----------------------------------------------------------------------
    def lookup_prefix(self, token_ids: list[int]) -> list[int]:
        """Block ids holding the longest cached prefix of ``token_ids``, in full blocks.

        At least one token is always left to compute, so the request has logits to sample.
        """
        if not self.prefix_caching:
            return []
        found: list[int] = []
        prev = None
        for i in range((len(token_ids) - 1) // self.block_size):
            chunk = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
            prev = chain_hash(prev, chunk)
            block_id = self._by_hash.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            found.append(block_id)
        return found

    def register_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that its computed tokens have filled since last time."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        hashes = request.block_hashes
        for i in range(len(hashes), request.num_computed_tokens // bs):
            chunk = tuple(request.token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(hashes[-1] if hashes else None, chunk)
            hashes.append(h)
            block = self.blocks[request.block_table[i]]
            if block.hash is None and h not in self._by_hash:
                block.hash, block.token_ids = h, chunk
                self._by_hash[h] = block.block_id

    def filled_hashes(self, request: Request, num_tokens: int) -> list[bytes]:
        """Hashes of the blocks that the request's first ``num_tokens`` tokens fill beyond those
        it has registered: what computing them would add to the prefix cache (none without it)."""
        if not self.prefix_caching:
            return []
        bs = self.block_size
        hashes = list(request.block_hashes)
        for i in range(len(hashes), num_tokens // bs):
            hashes.append(
                chain_hash(hashes[-1] if hashes else None, tuple(request.token_ids[i * bs : (i + 1) * bs]))
            )
        return hashes[len(request.block_hashes) :]

    # ---- allocation -----------------------------------------------------------------------
    def try_allocate(self, request: Request, num_new_tokens: int, prefix: list[int] = ()) -> bool:
        """Cover ``num_new_tokens`` more tokens of ``request`` with blocks; all or nothing.

        ``prefix`` (from ``lookup_prefix``) is adopted first, which only a request without
        blocks may do; its tokens count as computed.
        """
        if prefix and request.block_table:
            raise RuntimeError(f"request {request.request_id} already holds blocks")
        num_computed = len(prefix) * self.block_size if prefix else request.num_computed_tokens
        held = len(prefix) if prefix else len(request.block_table)
        num_needed = self.blocks_for(num_computed + num_new_tokens) - held
        num_prefix_free = sum(1 for b in prefix if self.blocks[b].ref_count == 0)
        if num_needed > self.num_free_blocks - num_prefix_free:
            return False
        for block_id in prefix:
            request.block_table.append(self._take(block_id, evict=False))
        if prefix:
            request.num_computed_tokens = num_computed
            request.block_hashes = [self.blocks[b].hash for b in prefix]
        for _ in range(max(num_needed, 0)):
            request.block_table.append(self._take(next(iter(self._free)), evict=True))
        return True

    def free(self, request: Request) -> None:
        """Release every block of ``request`` in both pools; tail blocks become the first to be reused."""
        self._host_free.extend(reversed(request.host_block_table))
        request.host_block_table = []
        self._release_device(request)

    # ---- swapping -------------------------------------------------------------------------
    def swap_out(self, request: Request) -> list[tuple[int, int]] | None:
        """Move the request's device blocks to the host pool; the (device, host) pairs to copy,
        or None if the host pool lacks room. Shared (prefix) blocks are copied too."""
        if request.host_block_table:
            raise RuntimeError(f"request {request.request_id} is already swapped out")
        if len(request.block_table) > len(self._host_free):
            return None
        pairs = [(block_id, self._host_free.pop()) for block_id in request.block_table]
        request.host_block_table = [host for _, host in pairs]
        self._release_device(request)
        return pairs

    def swap_in(self, request: Request) -> list[tuple[int, int]] | None:
        """Move the request's host blocks back into fresh device blocks; the (host, device)
        pairs to copy, or None if the device pool lacks room. Its full blocks are registered
        for prefix reuse again."""
        if request.block_table:
            raise RuntimeError(f"request {request.request_id} already holds device blocks")
        if len(request.host_block_table) > self.num_free_blocks:
            return None
        pairs = [(host, self._take(next(iter(self._free)), evict=True)) for host in request.host_block_table]
        request.block_table = [device for _, device in pairs]
        self._host_free.extend(reversed(request.host_block_table))
        request.host_block_table = []
        self.register_full_blocks(request)
        return pairs

    def _release_device(self, request: Request) -> None:
        for block_id in reversed(request.block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        request.block_table = []
        request.block_hashes = []

    def _take(self, block_id: int, evict: bool) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
            if evict and block.hash is not None:
                del self._by_hash[block.hash]
                block.hash, block.token_ids = None, ()
        block.ref_count += 1
        return block_id
