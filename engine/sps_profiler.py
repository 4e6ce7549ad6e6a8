"""Measure the engine's throughput curve SPS(B) on the actual model, device, dtype, threads.

Each point times a verify-shaped forward: B tokens spread over requests of 1 + 3 tokens with
128 tokens of KV context each, logits for every token, as speculative verification runs.
Results are cached as JSON keyed by what they were measured on, and reused on the next start.
"""

import logging
import os
import re
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.model_runner import ModelRunner
from scheduler import BlockManager, Request, SamplingParams, ScheduledRequest, SchedulerOutput
from scheduler.sps import SPSTable

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_TOKENS_PER_REQUEST = 4
_CONTEXT = 128


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/dspark/sps (the XDG convention; ~/.cache when unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dspark" / "sps"


# Bumped when the forward's kernels change speed (v2: oneDNN-prepacked projections), so a
# cached curve measured with the old kernels is not reused.
PROFILE_VERSION = 2


def profile_key(model_name: str, device: torch.device, dtype: str, threads: int, block_size: int,
                quantization: str = "none", tensor_parallel_size: int = 1, deterministic: bool = False,
                tp_invariant: bool = False) -> str:
    quant = "" if quantization == "none" else f"-{quantization}"
    tp = "" if tensor_parallel_size == 1 else f"-tp{tensor_parallel_size}"
    det = ("-det" if deterministic else "") + ("-tpinv" if tp_invariant else "")
    raw = f"{model_name}-{device.type}-{dtype}{quant}{tp}{det}-t{threads}-bs{block_size}-v{PROFILE_VERSION}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


def load_or_profile(runner: ModelRunner, block_manager: BlockManager, key: str, max_tokens: int,
                    refresh: bool = False) -> SPSTable:
    path = cache_dir() / f"{key}.json"
    if path.exists() and not refresh:
        table = SPSTable.load(path)
        logger.info("SPS profile loaded from %s", path)
        return table
    table = profile(runner, block_manager, key, max_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table.to_json())
    logger.info("SPS profile saved to %s", path)
    return table


def profile(runner: ModelRunner, block_manager: BlockManager, key: str, max_tokens: int,
            repeats: int = 3) -> SPSTable:
    sizes = [b for b in DEFAULT_BATCH_SIZES if b <= max_tokens] or [1]
    seconds = {b: time_verify_step(runner, block_manager, b, repeats)
               for b in tqdm(sizes, desc="profiling SPS", leave=False)}
    table = SPSTable.from_measurements(seconds, key)
    logger.info("SPS profile %s: %s", key, ", ".join(f"B={b}: {1 / t:.1f}/s" for b, t in seconds.items()))
    return table


def time_verify_step(runner: ModelRunner, block_manager: BlockManager, num_tokens: int,
                     repeats: int) -> float:
    """Median seconds of a verify-shaped forward of `num_tokens` tokens (after a warm-up)."""
    step, owners = _verify_shaped_step(num_tokens, block_manager)
    try:
        runner.all_logits(step)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.all_logits(step)
            if runner.device.type == "cuda":
                torch.cuda.synchronize(runner.device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    finally:
        for req in owners:
            block_manager.free(req)


def _verify_shaped_step(num_tokens: int, block_manager: BlockManager
                        ) -> tuple[SchedulerOutput, list[Request]]:
    """B tokens as requests of 1 + 3 tokens over 128 tokens of context, with borrowed blocks
    (returned by the caller through the owning requests)."""
    scheduled, owners = [], []
    left = num_tokens
    i = 0
    while left > 0:
        n = min(_TOKENS_PER_REQUEST, left)
        req = Request(f"sps-{i}", [1] * (_CONTEXT + n), SamplingParams(max_tokens=1))
        if not block_manager.can_allocate(req, _CONTEXT + n):
            break  # a smaller KV pool than the profile asks for: time what fits
        block_manager.allocate(req, _CONTEXT + n)
        owners.append(req)
        scheduled.append(ScheduledRequest(req.req_id, [1] * n, _CONTEXT, req.block_table,
                                          req.params, sample=False, num_output_tokens=0))
        left -= n
        i += 1
    return SchedulerOutput(scheduled), owners
