"""Paged KV tensors of the target model: per layer, [num_blocks, block_size, num_kv_heads, head_dim]."""

import torch

from engine.config import ModelArchConfig


class PagedKVCache:
    def __init__(self, arch: ModelArchConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (arch.num_layers, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(arch: ModelArchConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * elem

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[i], self.v[i]
