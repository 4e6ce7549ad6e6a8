"""A learned drafter's per-position context (e.g. its context K/V), paged in the target's KV
blocks: position p of a request lives in slot block_table[p // block_size] * block_size +
p % block_size. A prefix the target reuses from its prefix cache, or that n > 1 choices share,
therefore brings the drafter's context with it, and the KV budget covers both."""

import torch


class PagedContext:
    """`width` values of `dtype` per slot, for `num_blocks` blocks of `block_size` slots."""

    def __init__(self, num_blocks: int, block_size: int, width: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.data = torch.zeros(num_blocks * block_size, width, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(width: int, dtype: torch.dtype) -> int:
        return width * torch.empty((), dtype=dtype).element_size()

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot ids of positions start .. end - 1."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        assert end <= len(block_table) * self.block_size, "the block table does not cover the positions"
        return (table[pos // self.block_size] * self.block_size + pos % self.block_size).to(self.data.device)

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """values [len(slots), width]."""
        self.data.index_copy_(0, slots, values.to(self.data.dtype))

    def gather(self, block_tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """[R, max(lengths), width]: request r's positions 0 .. lengths[r] - 1, then padding
        (slot 0's values: callers mask positions past a request's length)."""
        l_max = max(lengths, default=0)
        bs = self.block_size
        width = max(1, -(-l_max // bs))
        tables = torch.zeros(len(lengths), width, dtype=torch.long)
        for r, (table, n) in enumerate(zip(block_tables, lengths)):
            assert n <= len(table) * bs, "the block table does not cover the positions"
            used = table[:width]
            tables[r, :len(used)] = torch.tensor(used, dtype=torch.long)
        pos = torch.arange(l_max)
        index = tables[:, pos // bs] * bs + pos % bs  # [R, L]; past a length: padding
        index[pos[None, :] >= torch.tensor(lengths)[:, None]] = 0
        return self.data[index.to(self.data.device)]

    def read(self, block_table: list[int], position: int) -> torch.Tensor:
        """[width]: one position's values."""
        return self.data[self.slots(block_table, position, position + 1)[0]]
