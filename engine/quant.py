"""Groupwise int4 weights straight from a GGUF file's Q4_1 blocks, for small steps on CPU.

A Q4_1 block holds 32 weights as w = d * q + m (q in 0..15, d and m fp16): exactly groupwise
int4 with a scale and a zero point, which torch's CPU kernel `_weight_int4pack_mm_for_cpu`
computes as (q - 8) * scale + zero, so zero = m + 8 d. The weights are the file's own values
(scales rounded to bf16, as the kernel takes them); nothing is re-quantized.

The kernel reads a quarter of the bytes of a bf16 weight but dequantises on the fly: it wins
while a step has few token rows (decode and short verify steps) and loses above, so a layer
keeps both forms and picks per call by the row count (`Linear` in engine/model.py).
"""

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

GROUP_SIZE = 32  # Q4_1's block size
QUANTIZATIONS = ("auto", "int4", "none")

# Steps of at most this many token rows run from int4 weights. Measured with
# `dspark bench kernels` on the 2-core development CPU (bench/results/kernels-*.json): int4 is
# 1.6-3x faster than oneDNN-prepacked bf16 for 1-2 rows, even at 4, slower from 8 on.
INT4_MAX_ROWS = 4


@dataclass(frozen=True, slots=True)
class Q4Blocks:
    """One weight matrix [N, K] in Q4_1 form."""

    q: torch.Tensor  # [N, K] uint8, 0..15
    scale: torch.Tensor  # [N, K / 32] fp32 (d)
    minimum: torch.Tensor  # [N, K / 32] fp32 (m)

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        w = self.q.view(n, k // GROUP_SIZE, GROUP_SIZE).float() * self.scale[..., None] + self.minimum[..., None]
        return w.view(n, k)

    def rows(self, index: np.ndarray) -> "Q4Blocks":
        """The same weight with its output rows reordered."""
        i = torch.from_numpy(np.ascontiguousarray(index))
        return Q4Blocks(self.q[i], self.scale[i], self.minimum[i])


def q4_1_blocks(raw: np.ndarray, shape: tuple[int, int]) -> Q4Blocks:
    """A GGUF Q4_1 tensor's bytes ([N, K/32 * 20] uint8: fp16 d, fp16 m, 16 bytes of nibbles,
    element j in the low nibble of byte j and element j + 16 in its high nibble)."""
    n, k = shape
    blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // GROUP_SIZE, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(n, k)
    return Q4Blocks(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m))


class Int4Weight:
    """A weight packed for `_weight_int4pack_mm_for_cpu` (bf16 activations; CPU only, so a
    plain object that `Module.to` leaves alone)."""

    __slots__ = ("out_features", "packed", "scales_and_zeros")

    def __init__(self, blocks: Q4Blocks) -> None:
        n, k = blocks.q.shape
        if k % GROUP_SIZE:
            raise ValueError(f"int4 weights need K divisible by {GROUP_SIZE}, got {k}")
        self.out_features = n
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(blocks.q.to(torch.int32), 1)
        zero = blocks.minimum + 8 * blocks.scale
        sz = torch.stack([blocks.scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.packed = packed
        self.scales_and_zeros = sz  # [K / 32, N, 2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] bf16 -> [M, N] bf16."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_and_zeros)


def concat_rows(parts: Iterable[Q4Blocks]) -> Q4Blocks:
    """Fused projections (Q/K/V, gate/up): the shards' output rows one after another."""
    parts = list(parts)
    return Q4Blocks(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                    torch.cat([p.minimum for p in parts]))


def int4_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def resolve_quantization(requested: str, device: torch.device, dtype: torch.dtype,
                         num_quantized: int) -> str:
    """`auto`: int4 where it runs (CPU, bf16, the file has Q4_1 weights), else none."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {requested!r}; choose one of {QUANTIZATIONS}")
    runs = device.type == "cpu" and dtype == torch.bfloat16 and int4_supported()
    if requested == "int4":
        if not runs:
            raise ValueError("int4 weights run on CPU in bfloat16 only (--device cpu --dtype bfloat16)")
        if not num_quantized:
            raise ValueError("int4 needs a GGUF model with Q4_1 weights; this model has none")
        return "int4"
    if requested == "auto" and runs and num_quantized:
        return "int4"
    return "none"
