"""Attention over flat batches with a paged KV cache.

Two backends with one interface: `prepare(batch)` once per step, `attend(...)` per layer.
`TorchAttention` is portable (CPU and CUDA); `FlashAttention` uses flash-attn's varlen paged
kernel on CUDA. Both write the step's new K/V into the cache first, then attend with a causal
mask aligned to the end of each sequence (query i of a request sees keys 0..context+i).
"""

import logging
import math
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
# CPU SDPA's key split (torch 2.13's flash kernel): deterministic mode pads keys to a multiple
_KEY_SPLIT = 512


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

    `min_query_rows` (--deterministic; None: off): each query row's result is bit for bit the
    same whatever else shares its step. CPU SDPA (torch 2.13) rounds a row differently with
    the number of query rows per call (on AVX512-BF16 CPUs: 1, 2-3 and 4-192 rows round three
    ways; its query split grows past 192), with the key length inside a 512-key split, and on
    the `is_causal` path. So every call is masked, holds `min_query_rows` to 32 query rows per
    sequence (longer chunks are cut into 32-row pieces, batched; the bound is probed at load,
    engine/batch_invariance.py), and attends to a multiple of 512 keys; padded keys and rows
    are masked out, which adds exact zeros.
    """

    name = "torch"

    def __init__(self, min_query_rows: int | None = None) -> None:
        self.min_query_rows = min_query_rows

    @property
    def deterministic(self) -> bool:
        return self.min_query_rows is not None

    def prepare(self, batch: FlatBatch) -> _TorchMeta:
        long_ = [r for r, q in enumerate(batch.query_lens) if q > _SHORT_QUERY]
        if self.deterministic:
            groups = [self._group(batch, [(r, off, min(_SHORT_QUERY, batch.query_lens[r] - off))
                                          for off in range(0, batch.query_lens[r], _SHORT_QUERY)])
                      for r in long_]
        else:
            groups = [self._group(batch, [(r, 0, batch.query_lens[r])]) for r in long_]
        groups += [self._group(batch, [(r, 0, batch.query_lens[r]) for r in reqs])
                   for reqs in _length_groups(batch)]
        return _TorchMeta(slot_mapping=batch.slot_mapping, groups=groups)

    def _group(self, batch: FlatBatch, pieces: list[tuple[int, int, int]]) -> _Group:
        """One SDPA call over `pieces` (request, first query of the piece, number of queries)."""
        device = batch.input_ids.device
        reqs = [r for r, _, _ in pieces]
        rows = torch.tensor(reqs, device=device)
        starts = batch.cu_seqlens_q.index_select(0, rows).long() + torch.tensor(
            [off for _, off, _ in pieces], device=device)  # [S]
        q_lens = torch.tensor([n for _, _, n in pieces], device=device)
        ctx_list = [batch.context_lens[r] + off for r, off, _ in pieces]
        ctx = torch.tensor(ctx_list, device=device)
        q_max = max(n for _, _, n in pieces)
        if self.min_query_rows is not None:
            q_max = max(q_max, self.min_query_rows)
        qi = torch.arange(q_max, device=device)
        if len(pieces) == 1 and ctx_list[0] == 0 and not self.deterministic:
            # A fresh prompt chunk: its keys are exactly its own tokens, plain causal attention.
            idx = starts[0] + qi
            return _Group(idx[None], None, None, qi, idx, identity=batch.num_reqs == 1)
        is_query = qi[None, :] < q_lens[:, None]  # [S, Qmax]
        q_index = torch.where(is_query, starts[:, None] + qi[None, :], 0)
        seq_lens = ctx + q_lens
        bs = batch.block_size
        l_max = max(c + n for c, (_, _, n) in zip(ctx_list, pieces))
        if self.deterministic:
            unit = math.lcm(bs, _KEY_SPLIT)  # whole blocks and whole key splits
            l_max = -(-l_max // unit) * unit
        num_blocks = -(-l_max // bs)
        tables = batch.block_tables.index_select(0, rows).long()  # [S, max_blocks]
        if tables.shape[1] < num_blocks:  # only the deterministic key padding reaches past
            tables = F.pad(tables, (0, num_blocks - tables.shape[1]))
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
        identity = (pieces == [(r, 0, q) for r, q in enumerate(batch.query_lens)]
                    and all(n == q_max for _, _, n in pieces))
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
                o = masked_attention(qg, kg, vg, g.mask, scale)
            o = o.transpose(1, 2).reshape(-1, num_heads, head_dim)
            if g.identity:  # the step's only group
                return o
            if out is None:
                out = torch.empty_like(q)
            out.index_copy_(0, g.token_index, o.index_select(0, g.valid))
        return out


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [S, H, Q, D], k/v [S, L, Hkv, D] (the cache's layout), mask [S, 1, Q, L] -> [S, H, Q, D].

    The query heads that share a KV head become rows of one call (rows ordered head, then
    query): CPU SDPA (torch 2.13) runs 32 decodes x 9 heads x 1 query row 3.5x slower than
    32 x 3 KV heads x 3 rows, and GQA's head expansion is then not needed."""
    s, num_heads, rows, d = q.shape
    group = num_heads // k.shape[2]
    if group > 1:
        q = q.reshape(s, num_heads // group, group * rows, d)
        mask = mask.expand(s, group, rows, mask.shape[-1]).reshape(s, 1, group * rows, -1)
    o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return o.reshape(s, num_heads, rows, d)


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


def make_backend(name: str, device: torch.device, min_query_rows: int | None = None) -> AttentionBackend:
    """`auto` picks flash-attn on CUDA when it imports, else the portable backend (always the
    portable one when deterministic, i.e. given `min_query_rows`: flash-attn's splits follow
    the batch)."""
    deterministic = min_query_rows is not None
    if name == "auto":
        name = "flash" if device.type == "cuda" and flash_attn_available() and not deterministic else "torch"
    if name == "flash":
        if device.type != "cuda":
            raise ValueError("the flash attention backend needs a CUDA device")
        if deterministic:
            raise ValueError("--deterministic needs the torch attention backend")
        return FlashAttention()
    if name == "torch":
        return TorchAttention(min_query_rows)
    raise ValueError(f"unknown attention backend {name!r}")
