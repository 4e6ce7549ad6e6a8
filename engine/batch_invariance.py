"""Row-invariant projections for `--deterministic`: each token's result must not depend on how
many other tokens share its forward, so greedy output is bit-identical alone, in any batch,
with or without speculation, in bf16.

A matrix product's kernel, and so its summation order, changes with the number of rows. On
AVX512-BF16 CPUs, oneDNN's bf16 kernels compute a 1-row call of a 1536-wide projection
differently from every call of 2 to 256 rows (7% of rows round differently), while 576-wide
ones agree at every size; other CPUs and GPUs switch elsewhere. So each projection shape is
probed at load time, on the model's own weights and this machine, for the row bounds that
reproduce a row's own result at every call size: 1-row calls padded to `min_rows`, longer ones
cut into chunks of at most `max_rows`. The probe compares hundreds of rows per call size,
because a different summation order only shows where it crosses a bf16 rounding boundary.
Attention's kernel switches the same way with the query rows per call: `probe_query_rows`
finds how many rows every call must hold (engine/attention.py pads to it). Everything else in
a layer is per row (norms, rotary, SwiGLU).
"""

from dataclasses import dataclass

import torch
from torch import nn

from engine.attention import masked_attention
from engine.config import ModelArchConfig
from engine.model import Linear

CANDIDATE_CHUNKS = (64, 32, 16, 8, 4, 2)
# call sizes probed under a chunk (1 row is the reference): every small one, the neighbours
# of each power of two (where kernels switch), and one past the chunk (a padded 1-row tail)
_PROBED_SIZES = (*range(2, 10), 15, 16, 17, 31, 32, 33, 63, 64, 65)
_PROBE_ROWS = 256
_PROBE_ROWS_WIDE = 64  # for an output as wide as an LM head, where each row costs 50x more
_WIDE = 8192
# attention: calls of up to this many query rows per sequence (TorchAttention's piece length),
# over keys that span two of SDPA's 512-key splits
_MAX_QUERY_ROWS = 32
_QUERY_ROW_CANDIDATES = (2, 4, 8, 16, 32)
_PROBE_SEQUENCES = 64  # with 16 of 16-dim heads, a 2-row call's different rounding went unseen
_PROBE_KEYS = 1024


@dataclass(frozen=True, slots=True)
class RowBounds:
    min_rows: int  # calls with fewer rows are zero-padded to this many
    max_rows: int  # calls with more rows run in chunks of at most this many


def _set(linear: Linear, bounds: RowBounds) -> None:
    linear.min_rows, linear.max_rows = bounds.min_rows, bounds.max_rows


def _reproduces(linear: Linear, x: torch.Tensor, alone: torch.Tensor, sizes: tuple[int, ...]) -> bool:
    """Whether calls of each size in `sizes` give every row of `x` its `alone` result."""
    return all(torch.equal(torch.cat([linear(part) for part in x.split(m)]), alone) for m in sizes)


@torch.inference_mode()
def probe_bounds(linear: Linear, generator: torch.Generator) -> RowBounds:
    """The bounds with the largest chunk under which every call size reproduces each row's
    1-row result (padded to 2 rows where a 1-row call is the odd one out); (1, 1) if none."""
    weight = linear.weight if linear.weight is not None else linear.packed_weight  # packed: dense freed
    assert weight is not None
    rows = _PROBE_ROWS_WIDE if linear.out_features > _WIDE else _PROBE_ROWS
    x = torch.randn(rows, linear.in_features, generator=generator).to(weight.device, weight.dtype)
    try:
        for min_rows in (1, 2):
            _set(linear, RowBounds(min_rows, 1))
            alone = torch.cat([linear(x[i:i + 1]) for i in range(rows)])
            for chunk in CANDIDATE_CHUNKS:
                if chunk < min_rows:
                    break
                bounds = RowBounds(min_rows, chunk)
                _set(linear, bounds)
                if _reproduces(linear, x, alone, tuple(m for m in _PROBED_SIZES if m <= chunk + 1)):
                    return bounds
        return RowBounds(1, 1)
    finally:
        _set(linear, RowBounds(1, 1))


def make_row_invariant(model: nn.Module) -> RowBounds:
    """Probe one projection of each shape and bound every projection of that shape; returns
    the tightest bounds set (the largest min_rows, the smallest chunk), for the log."""
    generator = torch.Generator().manual_seed(0)
    by_shape: dict[tuple[int, int], RowBounds] = {}
    for lin in (m for m in model.modules() if isinstance(m, Linear)):
        shape = (lin.in_features, lin.out_features)
        if shape not in by_shape:
            by_shape[shape] = probe_bounds(lin, generator)
        _set(lin, by_shape[shape])
    return RowBounds(max(b.min_rows for b in by_shape.values()), min(b.max_rows for b in by_shape.values()))


@torch.inference_mode()
def probe_query_rows(arch: ModelArchConfig, dtype: torch.dtype, device: torch.device) -> int:
    """The fewest query rows per sequence from which every call size up to 32, every row
    position and every number of sequences in a call give a query row the same result, for
    the heads `arch` holds."""
    generator = torch.Generator().manual_seed(0)
    num_heads, num_kv_heads, head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    s, keys, d = _PROBE_SEQUENCES, _PROBE_KEYS, head_dim
    query = randn(s, num_heads, d)
    k, v = randn(s, keys, num_kv_heads, d), randn(s, keys, num_kv_heads, d)
    lengths = torch.randint(1, keys + 1, (s,), generator=generator).to(device)
    visible = torch.arange(keys, device=device)[None, :] < lengths[:, None]  # [S, L]

    def attend(rows: int, row: int, seqs: int) -> torch.Tensor:
        """`query` at `row` of a call of `rows` query rows (the others random) -> [seqs, H, D]."""
        q = randn(seqs, num_heads, rows, d)
        q[:, :, row] = query[:seqs]
        mask = visible[:seqs, None, None, :].expand(seqs, 1, rows, keys)
        return masked_attention(q, k[:seqs], v[:seqs], mask, head_dim ** -0.5)[:, :, row]

    for min_rows in _QUERY_ROW_CANDIDATES:
        reference = attend(min_rows, 0, s)
        calls = [(rows, rows % 2 * (rows - 1), s) for rows in range(min_rows, _MAX_QUERY_ROWS + 1)]
        calls.append((_MAX_QUERY_ROWS, _MAX_QUERY_ROWS // 2, 1))
        if all(torch.equal(attend(*call), reference[:call[2]]) for call in calls):
            return min_rows
    raise RuntimeError("--deterministic: this machine's attention kernel rounds a query row "
                       "differently with the rows beside it at every padding tried")


def make_batch_invariant(model: nn.Module, arch: ModelArchConfig, dtype: torch.dtype,
                         device: torch.device) -> tuple[RowBounds, int]:
    """--deterministic at load: bound `model`'s projections and probe the query rows every
    attention call must hold for the heads `arch` holds (for the backend)."""
    return make_row_invariant(model), probe_query_rows(arch, dtype, device)
