"""Fixed-size KV blocks: reference counts, rollback by length, and the automatic prefix cache.

Prefix caching: a block whose positions all hold KV of committed tokens is keyed by a hash
chain over its tokens and every earlier block's (plus the request's cache salt), so the key
fixes the block's whole content. A new request takes the longest chain of cached blocks that
matches its tokens and computes only the rest. A block nobody references stays cached in the
free queue until an allocation needs it: evicted least recently freed first, blocks without a
key before all others, and a request's later blocks before its earlier ones (a chain is only
reusable from its start).
"""

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from scheduler.request import Request

BlockHash = bytes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chain_root(salt: str | None) -> BlockHash:
    """The parent key of a request's first block: requests with different salts share nothing."""
    return hashlib.blake2b(b"salt:" + (salt or "").encode(), digest_size=16).digest()


def block_hash(parent: BlockHash, token_ids: list[int]) -> BlockHash:
    return hashlib.blake2b(parent + array("l", token_ids).tobytes(), digest_size=16).digest()


@dataclass(frozen=True, slots=True)
class PrefixCacheStats:
    """Counters since start (tokens), and the pool's blocks by state."""

    queries: int
    hits: int
    num_referenced_blocks: int
    num_cached_free_blocks: int
    num_empty_blocks: int


class BlockManager:
    """Hands out KV-cache block ids to requests. Block ids index the engine's paged KV tensors
    (the target's and the drafter's context alike).

    A request owns `block_table`, enough blocks to hold the KV of its first N tokens. Blocks
    may be shared (`fork`, prefix-cache hits), so they carry reference counts and return to the
    free queue only when the last owner lets go.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # insertion order is eviction order: the front goes first
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._hash_of: dict[int, BlockHash] = {}  # cached blocks only
        self._cached: dict[BlockHash, int] = {}
        # cached blocks keyed by a request without drafter context (`Request.draft_context`):
        # their target KV is good, the drafter's context paged beside it was never written
        self._without_draft_context: set[int] = set()
        self._num_cached_free = 0  # keyed blocks in the free queue
        self._queries = 0
        self._hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: empty ones and cached ones nobody references."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests, 0.0 to 1.0."""
        return 1.0 - len(self._free) / self.num_blocks

    def stats(self) -> PrefixCacheStats:
        free, cached = len(self._free), self._num_cached_free
        return PrefixCacheStats(self._queries, self._hits, self.num_blocks - free, cached, free - cached)

    def num_blocks_needed(self, req: Request, num_tokens: int) -> int:
        """How many more blocks `req` needs to hold the KV of `num_tokens` tokens."""
        return max(0, cdiv(num_tokens, self.block_size) - len(req.block_table))

    def can_allocate(self, req: Request, num_tokens: int, reserve: int = 0) -> bool:
        return self.num_blocks_needed(req, num_tokens) + reserve <= len(self._free)

    def allocate(self, req: Request, num_tokens: int) -> None:
        """Grow `req.block_table` to cover `num_tokens` tokens. Caller checks `can_allocate`."""
        needed = self.num_blocks_needed(req, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {needed}, have {len(self._free)}")
        for _ in range(needed):
            block, _ = self._free.popitem(last=False)
            assert self._ref_counts[block] == 0
            self._evict(block)
            self._ref_counts[block] = 1
            req.block_table.append(block)

    # ---- prefix cache -----------------------------------------------------------------

    def cached_prefix(self, req: Request) -> list[int]:
        """The cached blocks that hold `req`'s first tokens, longest chain first to last; never
        all of its tokens (the last one's logits must be computed). No side effects."""
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position's logits
        num_full = (req.num_tokens - 1) // self.block_size
        self._hash_blocks(req, num_full)
        hit: list[int] = []
        for key in req.block_hashes[:num_full]:
            block = self._cached.get(key)
            if block is None:
                break
            hit.append(block)
        return hit

    def draft_context_prefix(self, hit: list[int]) -> int:
        """How many leading blocks of a cached prefix also hold the drafter's context."""
        return next((i for i, b in enumerate(hit) if b in self._without_draft_context), len(hit))

    def can_take(self, req: Request, hit: list[int], num_tokens: int, reserve: int = 0) -> bool:
        """Whether `req` (holding no blocks) fits `num_tokens` tokens when it takes `hit`."""
        assert not req.block_table
        idle = sum(1 for b in hit if self._ref_counts[b] == 0)  # taking them empties free slots
        return cdiv(num_tokens, self.block_size) - len(hit) + idle + reserve <= len(self._free)

    def take(self, req: Request, hit: list[int]) -> int:
        """Give `req` (holding no blocks) the cached blocks `hit`; returns the tokens they hold.
        Counts the lookup: `req`'s tokens queried, the hit's tokens found."""
        assert not req.block_table
        for block in hit:
            if self._ref_counts[block] == 0:
                del self._free[block]
                self._num_cached_free -= 1
            self._ref_counts[block] += 1
        req.block_table = list(hit)
        self._queries += req.num_tokens
        self._hits += len(hit) * self.block_size
        return len(hit) * self.block_size

    def cache_blocks(self, req: Request) -> None:
        """Key the blocks `req` has filled with committed KV, so later requests can reuse them.
        A block whose key another block already holds stays unkeyed (freed like any other)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens // self.block_size, len(req.block_table))
        self._hash_blocks(req, num_full)
        for i in range(req.num_cached_blocks, num_full):
            block, key = req.block_table[i], req.block_hashes[i]
            if block not in self._hash_of and key not in self._cached:
                self._cached[key] = block
                self._hash_of[block] = key
                if not req.draft_context:
                    self._without_draft_context.add(block)
        req.num_cached_blocks = max(req.num_cached_blocks, num_full)

    def _hash_blocks(self, req: Request, num_full: int) -> None:
        """Extend `req.block_hashes` to its first `num_full` blocks."""
        if len(req.block_hashes) >= num_full:
            return
        bs = self.block_size
        parent = req.block_hashes[-1] if req.block_hashes else chain_root(req.cache_salt)
        for i in range(len(req.block_hashes), num_full):
            parent = block_hash(parent, req.token_ids[i * bs:(i + 1) * bs])
            req.block_hashes.append(parent)

    def _evict(self, block: int) -> None:
        self._without_draft_context.discard(block)
        key = self._hash_of.pop(block, None)
        if key is not None:  # only free blocks are evicted
            del self._cached[key]
            self._num_cached_free -= 1

    # ---- release ----------------------------------------------------------------------

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Shrink `req.block_table` to just cover `num_tokens` tokens (e.g. after rejected drafts)."""
        keep = cdiv(num_tokens, self.block_size)
        while len(req.block_table) > keep:
            self._release(req.block_table.pop())

    def uncache(self, req: Request) -> None:
        """Unkey `req`'s blocks, whose KV is suspect (its logits went non-finite): no later
        request reuses them; whoever holds them keeps them until freed."""
        for block in req.block_table:
            self._without_draft_context.discard(block)
            key = self._hash_of.pop(block, None)
            if key is not None:  # held by `req`, so not among the free cached blocks
                del self._cached[key]

    def free(self, req: Request) -> None:
        """Release every block of `req`, its last first (see the eviction order above)."""
        self.rollback(req, 0)
        req.num_cached_blocks = 0

    def fork(self, parent: Request, child: Request, num_tokens: int) -> None:
        """Let `child` share the blocks that the first `num_tokens` tokens of `parent` fill
        completely (e.g. n>1 samples of one prompt). Only full blocks are shared, so neither
        owner ever writes into a shared block."""
        assert not child.block_table
        shared = parent.block_table[: num_tokens // self.block_size]
        for block in shared:
            self._ref_counts[block] += 1
        child.block_table = list(shared)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def _release(self, block: int) -> None:
        assert self._ref_counts[block] > 0, f"double free of block {block}"
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            self._free[block] = None
            if block in self._hash_of:
                self._num_cached_free += 1
            else:
                self._free.move_to_end(block, last=False)  # holds nothing reusable: goes first
