"""One config tree for the engine: model architecture, KV cache, scheduling, runtime."""

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from scheduler import InvalidRequest, SchedulerConfig

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class ModelArchConfig:
    """Architecture of a Llama-family / Qwen2 / Qwen3 decoder, from config.json or GGUF metadata."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16
    # Fixed number of KV blocks (tests use small pools); None sizes the pool from memory.
    num_blocks: int | None = None
    # KV memory budget on CPU; on CUDA the free memory times `gpu_memory_utilization`.
    kv_cache_bytes: int = 1 << 30
    gpu_memory_utilization: float = 0.85
    # Reuse the KV of full blocks of tokens earlier requests computed (scheduler/block_manager.py).
    enable_prefix_caching: bool = True


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    draft: str | None = None  # None = plain decoding; "ngram"
    num_draft_tokens: int = 4  # γ: the most draft tokens proposed per request and step


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # None = the embedded default model
    device: str = "cpu"
    dtype: str = "float32"
    max_model_len: int | None = None  # None = the model's own limit, capped by the KV pool
    attention_backend: str = "auto"  # auto | torch | flash
    # auto | int4 | none: int4 runs steps of few tokens from a GGUF file's Q4_1 weights (CPU,
    # bf16; engine/quant.py); auto picks it where it runs
    quantization: str = "auto"
    # bit-identical greedy output in any dtype, alone or batched, with or without speculation:
    # one weight format and row-invariant projections (engine/batch_invariance.py)
    deterministic: bool = False
    # with `deterministic`: the same bits on any tensor_parallel_size too (row-parallel sums in
    # one fixed order, engine/tensor_parallel.py); measured to cost one process 20% of decode
    tp_invariant: bool = False
    num_threads: int | None = None  # CPU threads for torch (per rank); None = all cores (shared by the ranks)
    # ranks of tensor parallelism (engine/tensor_parallel.py): worker processes beside this one
    tensor_parallel_size: int = 1
    seed: int = 0  # seeds the randomness of unseeded requests
    # Run each forward on a worker thread while the previous step's outputs are processed.
    overlap: bool = False
    # Python's GIL switch interval (s) while `AsyncLLM` runs (0: leave Python's 5 ms). The
    # engine thread and the event loop contend for the GIL; a thread asking for it waits up
    # to this long, which a token's stream otherwise pays between steps.
    gil_switch_interval: float = 0.0005
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_options(cls, model: str | os.PathLike | None = None, device: str | None = None,
                     dtype: str | None = None, **options: Any) -> "EngineConfig":
        """Build from flat keyword options (as `LLM(...)` and the CLI take them).

        Options named like a field of `CacheConfig` or `SchedulerConfig` go there.
        """
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = default_dtype(device)
        if dtype not in DTYPES:
            raise InvalidRequest(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}", "dtype")
        nested = {"cache": CacheConfig(), "scheduler": SchedulerConfig(),
                  "speculative": SpeculativeConfig()}
        top: dict[str, Any] = {}
        top_names = {f.name for f in fields(cls)} - set(nested)
        for key, value in options.items():
            target = next((n for n, c in nested.items() if key in {f.name for f in fields(c)}), None)
            if target is not None:
                nested[target] = replace(nested[target], **{key: value})
            elif key in top_names:
                top[key] = value
            else:
                raise InvalidRequest(f"unknown engine option {key!r}", key)
        return cls(model=None if model is None else str(model), device=device, dtype=dtype,
                   **top, **nested)


def default_dtype(device: str) -> str:
    """bf16 on CUDA; on CPU bf16 where the cores have native bf16 dot products, which bench/
    measured to be faster from batch 1 up (see bench/results/), else fp32."""
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if _cpu_has_avx512_bf16() else "float32"


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False
