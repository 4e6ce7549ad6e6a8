"""Llama-family / Qwen2 / Qwen3 decoder over flat token batches.

One module reads top to bottom: embedding, N x (attention + SwiGLU MLP), final norm, LM head.
Q/K/V and gate/up projections are fused (one matmul each). Attention goes through an
`AttentionContext`, handed down explicitly, which owns the paged KV cache and the backend.
Weights use Hugging Face names on load (`load_hf_weights`) so every loader shares one mapping.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionBackend
from engine.config import ModelArchConfig
from engine.kv_cache import PagedKVCache
from engine.quant import INT4_MAX_ROWS, Int4Weight, Q4Blocks, concat_rows


@dataclass(slots=True)
class AttentionContext:
    """Everything attention needs for one forward: backend, its per-step metadata, the cache."""

    backend: AttentionBackend
    meta: Any
    kv_cache: PagedKVCache


# Row count oneDNN tunes a packed weight for: decode and verify steps of up to a few dozen
# requests. Other row counts work too (a 256-row prefill still beats the dense path).
_PACK_ROWS_HINT = 32


class Linear(nn.Linear):
    """nn.Linear that can run from a oneDNN-prepacked copy of its weight (CPU).

    Prepacked, the projections of a decode step run 1.3-3x faster than `F.linear` on these
    CPUs, in fp32 and bf16 alike; the 49k-row LM head gains most (32 rows, fp32: 11 ms vs
    24 ms). `pack_weight()` switches after loading. The dense weight stays for autograd (a
    drafter training through the frozen LM head) unless `keep_dense=False` frees it.
    """

    packed_weight: torch.Tensor | None = None
    # the file's Q4_1 weights, used for calls of at most INT4_MAX_ROWS rows (engine/quant.py)
    int4: Int4Weight | None = None
    # --deterministic (engine/batch_invariance.py): calls with more rows run in chunks of at
    # most max_rows (None: one call), and calls or chunks with fewer than min_rows are padded
    # with zero rows, so every row meets a kernel that computes it as it would be alone
    min_rows: int = 1
    max_rows: int | None = None

    def pack_weight(self, keep_dense: bool) -> None:
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), _PACK_ROWS_HINT)
        if not keep_dense:
            self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_rows is None and self.min_rows == 1:
            return self._forward(x)
        rows = x.reshape(-1, x.shape[-1])
        parts = rows.split(self.max_rows) if self.max_rows is not None else (rows,)
        y = torch.cat([self._forward_padded(part) for part in parts])
        return y.view(*x.shape[:-1], -1)

    def _forward_padded(self, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        if n >= self.min_rows:
            return self._forward(rows)
        return self._forward(F.pad(rows, (0, 0, 0, self.min_rows - n)))[:n]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        int4 = self.int4
        if int4 is not None and x.dtype == torch.bfloat16 and x.numel() <= INT4_MAX_ROWS * x.shape[-1]:
            y = int4(x.reshape(-1, x.shape[-1]))
            y = y if self.bias is None else y + self.bias
            return y.view(*x.shape[:-1], -1)
        packed = self.packed_weight
        if packed is None or x.dtype != packed.dtype or (x.requires_grad and torch.is_grad_enabled()):
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], -1)


def prepack_linears(module: nn.Module) -> None:
    """Prepack every `Linear` under `module` for oneDNN, keeping the dense weights; a no-op
    off the CPU or without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return
    for m in module.modules():
        if isinstance(m, Linear) and m.weight is not None and m.weight.device.type == "cpu":
            m.pack_weight(keep_dense=True)


def linear_of_rows(weight: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    """A frozen `Linear` computing only the given output rows of `weight` [out, in] (and `bias`)."""
    lin = Linear(weight.shape[1], rows.numel(), bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.detach()[rows])
        if bias is not None:
            lin.bias.copy_(bias.detach()[rows])
    return lin.requires_grad_(False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, as Hugging Face computes them (torch's fused rms_norm measured no
        # faster for decode rows here)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with a precomputed cos/sin table indexed by position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the tables in fp32 where the buffers live (after `to(...)` or meta init)."""
        device = self.cos.device
        if device.type == "meta":
            return
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
        sign = torch.ones(d, device=device)
        sign[: d // 2] = -1  # see apply_rotary
        self.cos, self.sin = emb.cos(), emb.sin() * sign

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables at `positions` [...], shaped [..., 1, D] to broadcast over heads."""
        flat = positions.reshape(-1)
        shape = (*positions.shape, 1, self.head_dim)
        return (self.cos.index_select(0, flat).view(shape).to(dtype),
                self.sin.index_select(0, flat).view(shape).to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., heads, D] rotated by tables from `RotaryEmbedding.cos_sin`.

    Neox rotation x*cos + [-x2, x1]*sin, with the sign folded into the stored sine table so
    that [x2, x1] is a single `roll` (half the small ops of a decode step's rotary).
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                ctx: AttentionContext) -> torch.Tensor:
        num_tokens, heads = x.shape[0], self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        # one rotary call for queries and keys together
        q, k = apply_rotary(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        k_cache, v_cache = ctx.kv_cache.layer(self.layer_idx)
        o = ctx.backend.attend(q, k, v, k_cache, v_cache, ctx.meta, self.scale)  # [T, H, D]
        return self.o_proj(o.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, ctx):
        x = x + self.self_attn(self.input_layernorm(x), rope, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


# Hugging Face projection names -> (our fused parameter, shard index)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def fused_name(hf_name: str) -> tuple[str, int | None]:
    """A Hugging Face weight name (without `model.`) -> our parameter name and the shard it
    fills of a fused projection (None: a parameter of its own)."""
    parts = hf_name.split(".")
    if len(parts) >= 2 and parts[-2] in _FUSED:
        target, shard = _FUSED[parts[-2]]
        return ".".join(parts[:-2] + [target, parts[-1]]), shard
    return hf_name, None


class CausalLM(nn.Module):
    quantization = "none"  # "int4" once `attach_int4` gave the layers Q4_1 weights

    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Return final hidden states [T, hidden] and the outputs of `capture_layers` (by index)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.cos_sin(positions, x.dtype)  # once per step, shared by all layers
        captured: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, ctx)
            if i in capture_layers:
                captured[i] = x
        return self.norm(x), captured

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in fp32."""
        return self.lm_head(hidden).float()

    def pack_weights(self) -> None:
        """Prepack every projection for oneDNN (CPU). Layer weights are only ever used packed;
        the LM head keeps its dense weight (tied to the embedding, or needed for autograd)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack_weight(keep_dense=module is self.lm_head)

    @torch.no_grad()
    def load_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the (fused) parameters; fail on gaps or extras."""
        if self.config.tie_word_embeddings:
            # tied here rather than in __init__: moving a meta-initialised model unties parameters
            self.lm_head.weight = self.embed_tokens.weight
        params = dict(self.named_parameters())
        cfg = self.config
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        offsets = {"qkv_proj": [0, q, q + kv, q + 2 * kv], "gate_up_proj": [0, inter, 2 * inter]}
        loaded: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding serves as LM head
            if "rotary_emb" in name:
                continue
            pname, shard = fused_name(name)
            if shard is not None:
                target = pname.split(".")[-2]
                lo, hi = offsets[target][shard], offsets[target][shard + 1]
                dest = params[pname][lo:hi]
                loaded.add(f"{pname}#{shard}")
            else:
                if name not in params:
                    raise KeyError(f"unexpected weight {name!r}")
                dest = params[name]
                loaded.add(name)
            if dest.shape != tensor.shape:
                raise ValueError(f"weight {name!r}: expected shape {tuple(dest.shape)}, got {tuple(tensor.shape)}")
            dest.copy_(tensor)
        expected = set()
        for pname in params:
            target = pname.split(".")[-2] if "." in pname else ""
            if target in offsets:
                expected.update(f"{pname}#{i}" for i in range(len(offsets[target]) - 1))
            else:
                expected.add(pname)
        missing = expected - loaded
        if missing:
            raise KeyError(f"missing weights: {sorted(missing)[:8]}")

    def attach_int4(self, weights: dict[str, Q4Blocks]) -> int:
        """Give every layer projection whose shards all come as Q4_1 blocks (Hugging Face
        names) its int4 form; returns how many projections got one."""
        shards: dict[str, dict[int, Q4Blocks]] = {}
        for name, blocks in weights.items():
            pname, shard = fused_name(name.removeprefix("model."))
            shards.setdefault(pname.removesuffix(".weight"), {})[shard or 0] = blocks
        modules = dict(self.named_modules())
        count = 0
        for mname, parts in shards.items():
            module = modules.get(mname)
            if not isinstance(module, Linear) or module is self.lm_head:
                continue
            expected = {"qkv_proj": 3, "gate_up_proj": 2}.get(mname.rsplit(".", 1)[-1], 1)
            if len(parts) != expected:
                continue  # a fused projection with a shard in another format stays dense
            blocks = concat_rows(parts[i] for i in sorted(parts))
            if tuple(blocks.q.shape) != tuple(module.weight.shape if module.weight is not None
                                              else (module.out_features, module.in_features)):
                raise ValueError(f"int4 weight of {mname}: shape {tuple(blocks.q.shape)}")
            module.int4 = Int4Weight(blocks)
            count += 1
        return count
