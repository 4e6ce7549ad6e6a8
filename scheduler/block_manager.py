"""Fixed-size KV blocks: a free list, reference counts, and rollback by length."""

from collections import deque

from scheduler.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Hands out KV-cache block ids to requests. Block ids index the engine's paged KV tensors.

    A request owns `block_table`, enough blocks to hold the KV of its first N tokens. Blocks
    may be shared (`fork`), so they carry reference counts and return to the free list only
    when the last owner lets go.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0."""
        return 1.0 - len(self._free) / self.num_blocks

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
            block = self._free.popleft()
            assert self._ref_counts[block] == 0
            self._ref_counts[block] = 1
            req.block_table.append(block)

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Shrink `req.block_table` to just cover `num_tokens` tokens (e.g. after rejected drafts)."""
        keep = cdiv(num_tokens, self.block_size)
        while len(req.block_table) > keep:
            self._release(req.block_table.pop())

    def free(self, req: Request) -> None:
        """Release every block of `req`."""
        self.rollback(req, 0)

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
            self._free.append(block)
