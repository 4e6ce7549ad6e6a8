"""Attention over flat batches with a paged KV cache.

Two backends with one interface: `prepare(batch)` once per step, `attend(...)` per layer.
`TorchAttention` is portable (CPU and CUDA); `FlashAttention` uses flash-attn's varlen paged
kernel on CUDA. Both write the step's new K/V into the cache first, then attend with a causal
mask aligned to the end of each sequence (query i of a request sees keys 0..context+i).
"""

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.flat_batch import FlatBatch

logger = logging.getLogger(__name__)

# Requests with at most this many query tokens (decodes, verifies) share padded SDPA calls;
# longer prefill chunks each get their own, so a prefill never pads a whole batch.
_SHORT_QUERY = 32
# Short-query requests are grouped by length: a request joins the current group unless the
# padding it adds (rows x extra keys) exceeds what one more SDPA call costs, in key rows.
_GROUP_COST_KEYS = 1024


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def prepare(self, batch: FlatBatch) -> Any:
        """Per-step metadata shared by all layers."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, meta: Any, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D], caches [num_blocks, block_size, Hkv, D] -> [T, H, D]."""


@dataclass(slots=True)
class _Group:
    q_index: torch.Tensor  # [S, Qmax] flat token index of each padded query row
    # [S, NB] KV cache blocks of each request (keys: NB * block_size, masked past its length);
    # None: the keys are the new tokens
    kv_blocks: torch.Tensor | None
    mask: torch.Tensor | None  # [S, 1, Qmax, NB * block_size] bool; None: plain causal
    valid: torch.Tensor  # [n] rows of the padded [S*Qmax] output that are real tokens
    token_index: torch.Tensor  # [n] their flat token indices
    # the step's only group, its padded rows exactly the step's tokens in order (decodes or
    # verifies of equal length, one prompt chunk): queries are a view, the output needs no
    # scatter
    identity: bool = False


@dataclass(slots=True)
class _TorchMeta:
    slot_mapping: torch.Tensor
    groups: list[_Group]


class TorchAttention(AttentionBackend):
    """Gathers each request's K/V from its blocks and runs PyTorch SDPA, batched by group.

    `deterministic`: each query row's result is bit for bit the same whatever else shares its
    call. Measured on CPU (torch 2.13, bf16): SDPA with a boolean mask gives a row the same
    result for any number of query rows >= 2, any key padding and any grouping of requests,
    while a 1-row call and the `is_causal` path each round differently. So every call is
    masked and has at least 2 query rows (a decode gets a padded one).
    """

    name = "torch"

    def __init__(self, deterministic: bool = False) -> None:
        self.deterministic = deterministic

    def prepare(self, batch: FlatBatch) -> _TorchMeta:
        long_ = [r for r, q in enumerate(batch.query_lens) if q > _SHORT_QUERY]
        groups = [self._group(batch, [r]) for r in long_]
        groups += [self._group(batch, reqs) for reqs in _length_groups(batch)]
        return _TorchMeta(slot_mapping=batch.slot_mapping, groups=groups)

    def _group(self, batch: FlatBatch, reqs: list[int]) -> _Group:
        device = batch.input_ids.device
        rows = torch.tensor(reqs, device=device)
        starts = batch.cu_seqlens_q.index_select(0, rows).long()  # [S]
        q_lens = torch.tensor([batch.query_lens[r] for r in reqs], device=device)
        ctx = torch.tensor([batch.context_lens[r] for r in reqs], device=device)
        q_max = max(batch.query_lens[r] for r in reqs)
        if self.deterministic:
            q_max = max(q_max, 2)
        qi = torch.arange(q_max, device=device)
        if len(reqs) == 1 and batch.context_lens[reqs[0]] == 0 and not self.deterministic:
            # A fresh prompt chunk: its keys are exactly its own tokens, plain causal attention.
            idx = starts[0] + qi
            return _Group(idx[None], None, None, qi, idx, identity=batch.num_reqs == 1)
        is_query = qi[None, :] < q_lens[:, None]  # [S, Qmax]
        q_index = torch.where(is_query, starts[:, None] + qi[None, :], 0)
        seq_lens = ctx + q_lens
        bs = batch.block_size
        l_max = max(batch.context_lens[r] + batch.query_lens[r] for r in reqs)
        num_blocks = -(-l_max // bs)
        tables = batch.block_tables.index_select(0, rows).long()  # [S, max_blocks]
        assert tables.shape[1] >= num_blocks
        # Whole blocks are gathered (contiguous rows: several times faster than key by key on
        # CPU); blocks past a request's length (table padding) read block 0, masked below.
        used = torch.arange(num_blocks, device=device)[None, :] < (seq_lens[:, None] + bs - 1) // bs
        kv_blocks = torch.where(used, tables[:, :num_blocks], 0)
        pos = torch.arange(num_blocks * bs, device=device)
        # query i sits at position ctx+i and sees keys 0..ctx+i; padded rows see key 0 only,
        # so their softmax stays finite
        visible = pos[None, None, :] <= (ctx[:, None] + qi[None, :])[:, :, None]
        mask = torch.where(is_query[:, :, None], visible, pos[None, None, :] == 0)[:, None]
        valid = is_query.reshape(-1).nonzero()[:, 0]
        identity = reqs == list(range(batch.num_reqs)) and all(batch.query_lens[r] == q_max for r in reqs)
        return _Group(q_index, kv_blocks, mask, valid, q_index.reshape(-1).index_select(0, valid), identity)

    def attend(self, q, k, v, k_cache, v_cache, meta: _TorchMeta, scale):
        """SDPA in the model's dtype: on CPU with torch 2.13, bf16 SDPA beats fp32 at decode,
        verify and prefill shapes (64 decodes x 400 keys: 4.5 ms vs 6.7, and 13 with the cast)."""
        k_cache.view(-1, *k_cache.shape[-2:]).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[-2:]).index_copy_(0, meta.slot_mapping, v)
        num_heads, head_dim = q.shape[1], q.shape[2]
        out = None
        for g in meta.groups:
            # index_select on flat indices: advanced indexing of a large tensor is far slower on CPU
            qg = q.view(*g.q_index.shape, num_heads, head_dim) if g.identity else _gather(q, g.q_index)
            qg = qg.transpose(1, 2)  # [S, H, Qmax, D]
            if g.kv_blocks is None:
                kg = k.index_select(0, g.token_index)[None].transpose(1, 2)
                vg = v.index_select(0, g.token_index)[None].transpose(1, 2)
                o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale,
                                                   enable_gqa=True)
            else:
                s = g.kv_blocks.shape[0]
                kg = _gather(k_cache, g.kv_blocks).view(s, -1, *k_cache.shape[-2:]).to(q.dtype)
                vg = _gather(v_cache, g.kv_blocks).view(s, -1, *v_cache.shape[-2:]).to(q.dtype)
                o = F.scaled_dot_product_attention(qg, kg.transpose(1, 2), vg.transpose(1, 2),
                                                   attn_mask=g.mask, scale=scale, enable_gqa=True)
            o = o.transpose(1, 2).reshape(-1, num_heads, head_dim)
            if g.identity:  # the step's only group
                return o
            if out is None:
                out = torch.empty_like(q)
            out.index_copy_(0, g.token_index, o.index_select(0, g.valid))
        return out


def _length_groups(batch: FlatBatch) -> list[list[int]]:
    """Short-query requests in groups of similar total length (keys gathered and attended to
    are padded to the longest in a group; one group for all would pad most to the longest)."""
    seq_len = {r: batch.context_lens[r] + q for r, q in enumerate(batch.query_lens) if q <= _SHORT_QUERY}
    groups: list[list[int]] = []
    longest = 0
    for r in sorted(seq_len, key=seq_len.__getitem__):
        if groups and len(groups[-1]) * (seq_len[r] - longest) <= _GROUP_COST_KEYS:
            groups[-1].append(r)
        else:
            groups.append([r])
        longest = seq_len[r]
    return groups


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for a 2-D index, via index_select: [N, ...] x [S, L] -> [S, L, ...]."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


@dataclass(slots=True)
class _FlashMeta:
    batch: FlatBatch


class FlashAttention(AttentionBackend):
    """flash-attn 2 varlen kernel reading K/V straight from the paged cache (CUDA only).

    flash-attn's paged path needs a block size that is a multiple of 256.
    """

    name = "flash"
    block_size_multiple = 256

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func

        self._varlen = flash_attn_varlen_func

    def prepare(self, batch: FlatBatch) -> _FlashMeta:
        return _FlashMeta(batch)

    def attend(self, q, k, v, k_cache, v_cache, meta: _FlashMeta, scale):
        b = meta.batch
        k_cache.view(-1, *k_cache.shape[-2:]).index_copy_(0, b.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[-2:]).index_copy_(0, b.slot_mapping, v)
        return self._varlen(q, k_cache, v_cache, cu_seqlens_q=b.cu_seqlens_q,
                            cu_seqlens_k=b.cu_seqlens_k, max_seqlen_q=b.max_query_len,
                            max_seqlen_k=b.max_seq_len, softmax_scale=scale, causal=True,
                            block_table=b.block_tables)


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def make_backend(name: str, device: torch.device, deterministic: bool = False) -> AttentionBackend:
    """`auto` picks flash-attn on CUDA when it imports, else the portable backend (always the
    portable one when `deterministic`: flash-attn's splits follow the batch)."""
    if name == "auto":
        name = "flash" if device.type == "cuda" and flash_attn_available() and not deterministic else "torch"
    if name == "flash":
        if device.type != "cuda":
            raise ValueError("the flash attention backend needs a CUDA device")
        if deterministic:
            raise ValueError("--deterministic needs the torch attention backend")
        return FlashAttention()
    if name == "torch":
        return TorchAttention(deterministic)
    raise ValueError(f"unknown attention backend {name!r}")
