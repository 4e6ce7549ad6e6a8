"""Row-invariant projections for `--deterministic`: each token's result must not depend on how
many other tokens share its forward, so greedy output is bit-identical alone, in any batch,
with or without speculation, in bf16.

A matrix product's kernel, and so its summation order, changes with the number of rows (on
these CPUs oneDNN's bf16 kernels give every row exactly its 1-row result up to 32 rows, then
switch). The projections therefore run in chunks no larger than the largest row count for
which that holds, probed at load time on the model's own weights, on this machine (other CPUs
and GPUs switch elsewhere). Everything else in a layer is per row (norms, rotary, SwiGLU) or
per request (attention).
"""

import torch
from torch import nn

from engine.model import Linear

CANDIDATE_CHUNKS = (64, 32, 16, 8, 4, 2, 1)


@torch.inference_mode()
def invariant_chunk(linear: Linear, generator: torch.Generator) -> int:
    """The largest candidate chunk c such that every call of 1..c rows gives each row bit for
    bit what it gets alone."""
    weight = linear.weight if linear.weight is not None else linear.packed_weight  # packed: dense freed
    assert weight is not None
    x = torch.randn(max(CANDIDATE_CHUNKS), linear.in_features, generator=generator).to(weight.device, weight.dtype)
    alone = torch.cat([linear(x[i:i + 1]) for i in range(x.shape[0])])
    for chunk in CANDIDATE_CHUNKS:
        if all(torch.equal(linear(x[:m]), alone[:m]) for m in range(2, chunk + 1)):
            return chunk
    return 1


def make_row_invariant(model: nn.Module) -> int:
    """Probe one projection of each shape, then cap every projection at the smallest chunk
    found; returns it."""
    generator = torch.Generator().manual_seed(0)
    by_shape: dict[tuple[int, int], int] = {}
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for lin in linears:
        shape = (lin.in_features, lin.out_features)
        if shape not in by_shape:
            by_shape[shape] = invariant_chunk(lin, generator)
    chunk = min(by_shape.values())
    for lin in linears:
        lin.max_rows = chunk
    return chunk
