"""Tensor parallelism (`--tensor-parallel-size N`), Megatron-style, over torch.distributed.

Each of N ranks holds a slice of every layer: column-parallel Q/K/V and gate/up projections
(its KV heads with their query heads; its share of the MLP), row-parallel output and down
projections whose partial sums are all-reduced, and a vocabulary-parallel LM head whose logits
are all-gathered. Heads split as evenly as the KV heads allow (SmolLM2's 3 KV heads over 2 ranks:
2 + 1), so N may be any size up to the number of KV heads.

Rank 0 is the engine's own process: the scheduler, sampler and drafter stay there, single. The
model runner sees a `TensorParallelLM`, which has the model's interface: each forward or logits
call first broadcasts the step (the flat batch's ids, positions and attention metadata) to
ranks 1..N-1, worker processes the engine starts, which run the same call on their slices with
their own KV caches. The drafter keeps full copies of what it shares with the target (the
embedding, and the LM head: for tied weights, the embedding itself), so drafting needs no
communication. gloo on CPU, NCCL on CUDA (one device per rank).

With `--deterministic --tp-invariant` the output does not depend on N either: the output and
down projections cut their inputs at fixed bounds (every rank boundary of every valid N), each
chunk's partial product is computed alone, and the partials are added one at a time in input
order after an all-gather (`FixedOrderSum`), on one rank as on N. The column-parallel
projections and the LM head give each output column the same bits whole or sliced, and
attention is per head, so nothing else needs care. One process pays for the smaller matmuls
(measured: 20% of decode tok/s, bf16, 1 and 8 requests), hence a flag of its own.
"""

import itertools
import logging
import multiprocessing as mp
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.config import EngineConfig, ModelArchConfig
from engine.model import AttentionContext, CausalLM, Linear, linear_of_rows

logger = logging.getLogger(__name__)

_FORWARD, _LOGITS, _STOP = "forward", "logits", "stop"


def split(n: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of rank's share of n items, as even as possible (earlier ranks take the rest)."""
    base, rest = divmod(n, world)
    lo = rank * base + min(rank, rest)
    return lo, lo + base + (rank < rest)


def local_arch(arch: ModelArchConfig, rank: int, world: int) -> ModelArchConfig:
    """The shapes one rank holds (its heads: what its KV cache is sized for)."""
    lo, hi = split(arch.num_kv_heads, world, rank)
    group = arch.num_heads // arch.num_kv_heads
    return replace(arch, num_kv_heads=hi - lo, num_heads=(hi - lo) * group)


def check_size(arch: ModelArchConfig, world: int) -> None:
    if world < 1 or world > arch.num_kv_heads:
        raise ValueError(f"tensor parallel size {world}: the model has {arch.num_kv_heads} KV heads "
                         f"(1 to {arch.num_kv_heads} ranks)")


class RowParallel(nn.Module):
    """A projection over this rank's slice of the inputs; the ranks' partial sums add up."""

    def __init__(self, inner: Linear) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        dist.all_reduce(y)
        return y


class FixedOrderSum(nn.Module):
    """A row-parallel projection summed in a fixed order (`--tp-invariant`): its inputs cut at
    `bounds`, one partial product per chunk, the partials of all ranks gathered and added in
    input order. `ranges` holds each rank's [lo, hi) of the inputs (whole chunks); one range
    means one process."""

    def __init__(self, linear: Linear, bounds: Sequence[int], ranges: Sequence[tuple[int, int]],
                 rank: int) -> None:
        super().__init__()
        lo, hi = ranges[rank]
        mine = [b for b in bounds if lo <= b <= hi]
        self.cuts = [(a - lo, b - lo) for a, b in itertools.pairwise(mine)]
        self.parts = nn.ModuleList(_columns(linear, a, b) for a, b in itertools.pairwise(mine))
        self.counts = [sum(1 for b in bounds if r_lo < b <= r_hi) for r_lo, r_hi in ranges]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partials = [part(x[..., a:b].contiguous()) for part, (a, b) in zip(self.parts, self.cuts)]
        if len(self.counts) > 1:  # one stacked send per rank, padded to the largest share
            padded = partials[0].new_zeros(max(self.counts), *partials[0].shape)
            torch.stack(partials, out=padded[: len(partials)])
            gathered = [torch.empty_like(padded) for _ in self.counts]
            dist.all_gather(gathered, padded)
            partials = [p for g, n in zip(gathered, self.counts) for p in g[:n]]
        out = partials[0]  # a fresh tensor (a projection's output or a gathered buffer): ours to add into
        for p in partials[1:]:
            out += p
        return out


def fixed_bounds(arch: ModelArchConfig) -> tuple[list[int], list[int]]:
    """Where `FixedOrderSum` cuts the inputs of the output and down projections: at every rank
    boundary of every valid tensor-parallel size (SmolLM2: per KV group of heads, and the MLP's
    1536 at 512, 768 and 1024)."""
    q_per_kv = arch.num_heads // arch.num_kv_heads * arch.head_dim
    worlds = range(1, arch.num_kv_heads + 1)
    heads = {split(arch.num_kv_heads, w, r)[1] * q_per_kv for w in worlds for r in range(w)}
    inter = {split(arch.intermediate_size, w, r)[1] for w in worlds for r in range(w)}
    return sorted(heads | {0}), sorted(inter | {0})


def fix_summation_order(model: CausalLM) -> None:
    """One process, `--tp-invariant`: sum the row-parallel projections as N ranks would."""
    o_bounds, down_bounds = fixed_bounds(model.config)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.o_proj = FixedOrderSum(attn.o_proj, o_bounds, [(0, attn.o_proj.in_features)], 0)
        mlp.down_proj = FixedOrderSum(mlp.down_proj, down_bounds, [(0, mlp.down_proj.in_features)], 0)


def _columns(linear: Linear, lo: int, hi: int) -> Linear:
    out = Linear(hi - lo, linear.out_features, bias=linear.bias is not None)
    out.weight = nn.Parameter(linear.weight.detach()[:, lo:hi].clone(), requires_grad=False)
    if linear.bias is not None:  # added once, by rank 0's share
        out.bias = nn.Parameter(linear.bias.detach().clone() * (lo == 0), requires_grad=False)
    return out


def vocab_chunk(vocab_size: int, world: int) -> int:
    return -(-vocab_size // world)  # equal chunks for all_gather; the last one padded


@torch.no_grad()
def shard(model: CausalLM, rank: int, world: int, fixed_order: bool = False) -> Linear:
    """Cut a loaded (dense, unpacked) model down to rank's slices, in place; returns the full
    LM head it replaced. `fixed_order`: row-parallel sums as `FixedOrderSum`."""
    cfg = model.config
    check_size(cfg, world)
    d, group = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    kv_lo, kv_hi = split(cfg.num_kv_heads, world, rank)
    q_lo, q_hi = kv_lo * group * d, kv_hi * group * d
    q_size, kv_size = cfg.num_heads * d, cfg.num_kv_heads * d
    inter_lo, inter_hi = split(cfg.intermediate_size, world, rank)
    qkv_rows = torch.cat([torch.arange(q_lo, q_hi), q_size + torch.arange(kv_lo * d, kv_hi * d),
                          q_size + kv_size + torch.arange(kv_lo * d, kv_hi * d)])
    inter = cfg.intermediate_size
    gate_up_rows = torch.cat([torch.arange(inter_lo, inter_hi), inter + torch.arange(inter_lo, inter_hi)])
    o_bounds, down_bounds = fixed_bounds(cfg)
    q_ranges = [(lo * group * d, hi * group * d) for lo, hi in (split(cfg.num_kv_heads, world, r) for r in range(world))]
    inter_ranges = [split(inter, world, r) for r in range(world)]
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = linear_of_rows(attn.qkv_proj.weight, qkv_rows, attn.qkv_proj.bias)
        attn.o_proj = (FixedOrderSum(attn.o_proj, o_bounds, q_ranges, rank) if fixed_order
                       else RowParallel(_columns(attn.o_proj, q_lo, q_hi)))
        attn.num_kv_heads, attn.num_heads = kv_hi - kv_lo, (kv_hi - kv_lo) * group
        attn.q_size, attn.kv_size = attn.num_heads * d, attn.num_kv_heads * d
        mlp.gate_up_proj = linear_of_rows(mlp.gate_up_proj.weight, gate_up_rows)
        mlp.down_proj = (FixedOrderSum(mlp.down_proj, down_bounds, inter_ranges, rank) if fixed_order
                         else RowParallel(_columns(mlp.down_proj, inter_lo, inter_hi)))
    chunk = vocab_chunk(cfg.vocab_size, world)
    lo = rank * chunk
    rows = torch.arange(lo, lo + chunk).clamp(max=cfg.vocab_size - 1)  # padding repeats the last row
    full = model.lm_head
    model.lm_head = linear_of_rows(full.weight, rows)
    return full


def gather_logits(local: torch.Tensor, vocab_size: int, world: int) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def _broadcast(command: tuple) -> tuple:
    box = [command]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TensorParallelLM(nn.Module):
    """Rank 0's view: the model's interface over N ranks (see the module docstring)."""

    def __init__(self, local: CausalLM, world: int) -> None:
        super().__init__()
        self.local = local
        self.config = local.config
        self.quantization = local.quantization
        # what the drafter shares with the target, whole (`build_model` kept the full LM head)
        self.embed_tokens, self.norm, self.lm_head = local.embed_tokens, local.norm, local.full_lm_head
        self.world = world
        self.workers: list[Any] = []  # started once the engine has sized the KV cache

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        _broadcast((_FORWARD, input_ids, positions, ctx.meta, capture_layers))
        return self.local(input_ids, positions, ctx, capture_layers)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        _broadcast((_LOGITS, hidden))
        return gather_logits(self.local.compute_logits(hidden), self.config.vocab_size, self.world)

    def close(self) -> None:
        if not self.workers:
            return
        _broadcast((_STOP,))
        for w in self.workers:
            w.join(timeout=30)
            if w.is_alive():
                w.kill()
        self.workers = []
        dist.destroy_process_group()


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    config: EngineConfig
    num_blocks: int
    block_size: int
    init_method: str
    world: int
    num_threads: int


def start_workers(config: EngineConfig, num_blocks: int, block_size: int) -> list[Any]:
    """Spawn ranks 1..N-1 and join the process group as rank 0."""
    world = config.tensor_parallel_size
    init = f"file://{tempfile.mkdtemp(prefix='dspark-tp-')}/rendezvous"
    threads = config.num_threads or max(1, (os.cpu_count() or 1) // world)
    spec = WorkerSpec(config, num_blocks, block_size, init, world, threads)
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=worker_main, args=(spec, rank), daemon=True, name=f"dspark-tp{rank}")
               for rank in range(1, world)]
    for w in workers:
        w.start()
    logger.info("tensor parallel: %d ranks over %s, %d threads each", world, _backend(config), threads)
    # join in a side thread, so a worker that dies while loading is an error here, not a hang
    joined, errors = threading.Event(), []

    def join() -> None:
        try:
            init_group(spec, 0)
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller below
            errors.append(e)
        finally:
            joined.set()

    threading.Thread(target=join, daemon=True, name="dspark-tp-join").start()
    while not joined.wait(0.2):
        dead = [w for w in workers if not w.is_alive()]
        if dead:
            raise RuntimeError(f"tensor-parallel worker {dead[0].name} exited (code {dead[0].exitcode}) "
                               "before joining; its error is in the log above")
    if errors:
        raise errors[0]
    return workers


# A worker waits in a broadcast for the next step, however long the server stays idle.
_COLLECTIVE_TIMEOUT = timedelta(days=365)


def _backend(config: EngineConfig) -> str:
    return "nccl" if config.device.startswith("cuda") else "gloo"


def init_group(spec: WorkerSpec, rank: int) -> None:
    dist.init_process_group(_backend(spec.config), init_method=spec.init_method, rank=rank,
                            world_size=spec.world, timeout=_COLLECTIVE_TIMEOUT)


def device_of(config: EngineConfig, rank: int) -> torch.device:
    device = torch.device(config.device)
    return torch.device("cuda", rank) if device.type == "cuda" else device


def worker_main(spec: WorkerSpec, rank: int) -> None:
    """Rank 1..N-1: build this rank's slices and KV cache, then run what rank 0 broadcasts."""
    from engine.attention import make_backend
    from engine.batch_invariance import make_batch_invariant
    from engine.kv_cache import PagedKVCache
    from engine.loader import build_model, load_checkpoint

    torch.set_num_threads(spec.num_threads)
    device = device_of(spec.config, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ckpt = load_checkpoint(spec.config.model)
    deterministic = spec.config.deterministic
    model = build_model(ckpt, device, spec.config.torch_dtype, "none", tp=(rank, spec.world),
                        fixed_order=spec.config.tp_invariant)
    arch = local_arch(ckpt.arch, rank, spec.world)
    min_query_rows = None
    if deterministic:
        _, min_query_rows = make_batch_invariant(model, arch, spec.config.torch_dtype, device)
    kv = PagedKVCache(arch, spec.num_blocks, spec.block_size, spec.config.torch_dtype, device)
    backend = make_backend(spec.config.attention_backend, device, min_query_rows)
    init_group(spec, rank)
    with torch.inference_mode():
        while True:
            command = _broadcast((None,))
            if command[0] == _FORWARD:
                _, input_ids, positions, meta, capture = command
                model(input_ids, positions, AttentionContext(backend, meta, kv), capture)
            elif command[0] == _LOGITS:
                gather_logits(model.compute_logits(command[1]), ckpt.arch.vocab_size, spec.world)
            else:
                break
    dist.destroy_process_group()
