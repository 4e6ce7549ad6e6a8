"""`dspark draft data`: regenerate responses to the training prompts with the target itself.

Responses come from our own engine (chat template, continuous batching), so the drafter learns
the distribution it will be asked to predict. The output is one JSON line per (prompt, sample):
`{"key", "dataset", "split", "prompt_ids", "response_ids", "finish_reason"}`. A rerun skips keys
already written (resume after interruption). A deterministic fraction of prompts is held out
(`split == "heldout"`) for calibration.
"""

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from draft.training.cache import CacheWriter, FeatureRecorder

logger = logging.getLogger(__name__)

RESPONSES_FILE = "responses.jsonl"


@dataclass(frozen=True, slots=True)
class DataConfig:
    prompt_files: tuple[str, ...]
    out_dir: str
    model: str | None = None
    dtype: str = "bfloat16"
    max_prompts_per_file: int = 160
    max_prompt_tokens: int = 384
    max_new_tokens: int = 192
    samples_per_prompt: int = 1
    # SmolLM2-Instruct's model card samples with temperature 0.2, top_p 0.9.
    temperature: float = 0.2
    top_p: float = 0.9
    heldout_fraction: float = 0.1
    batch_size: int = 64
    seed: int = 0


def read_prompts(path: str | Path) -> list[list[str]]:
    """The `turns` of each line of a prompt file (the ../shared/data format)."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(list(json.loads(line)["turns"]))
    return rows


def read_responses(out_dir: str | Path, split: str | None = None) -> list[dict]:
    path = Path(out_dir) / RESPONSES_FILE
    if not path.exists():
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
            if split is None or row["split"] == split:
                rows.append(row)
    return list({row["key"]: row for row in rows}.values())  # a resumed batch may repeat


def _jobs(cfg: DataConfig, encode) -> Iterator[tuple[str, str, str, list[int]]]:
    """(key, dataset, split, prompt_ids) for every sample to generate, in a fixed order."""
    for file in cfg.prompt_files:
        name = Path(file).stem
        prompts = read_prompts(file)
        order = list(range(len(prompts)))
        random.Random(f"{cfg.seed}:{name}").shuffle(order)
        taken = 0
        for i in order:
            if taken >= cfg.max_prompts_per_file:
                break
            ids = encode([{"role": "user", "content": prompts[i][0]}])
            if len(ids) > cfg.max_prompt_tokens:
                continue
            taken += 1
            split = "heldout" if random.Random(f"{cfg.seed}:{name}:{i}").random() < cfg.heldout_fraction else "train"
            for s in range(cfg.samples_per_prompt):
                yield f"{name}:{i}:{s}", name, split, ids


def generate(cfg: DataConfig, cache_layers: tuple[int, ...] | None = None) -> Path:
    """Generate (or finish generating) the responses, and with `cache_layers` the target cache
    (`out_dir/cache`) captured in the same pass; returns the responses file."""
    from engine import LLM, SamplingParams

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESPONSES_FILE
    recorder = writer = None
    llm = None
    if cache_layers:
        recorder = FeatureRecorder(cache_layers)
    llm = LLM(model=cfg.model, dtype=cfg.dtype, max_num_seqs=cfg.batch_size,
              max_num_batched_tokens=2048, seed=cfg.seed, drafter=recorder)
    arch = llm.engine.arch
    if cache_layers:
        if cache_layers[-1] != arch.num_layers - 1:
            raise ValueError(f"the last cached layer must be the target's last ({arch.num_layers - 1})")
        writer = CacheWriter(out / "cache", cache_layers, arch.hidden_size)
        done = writer.done_keys()  # the cache is the source of truth
    else:
        done = {row["key"] for row in read_responses(out)}
    jobs = list(_jobs(cfg, llm.encode_chat))
    todo = [j for j in jobs if j[0] not in done]
    logger.info("%d samples in all, %d already done", len(jobs), len(jobs) - len(todo))
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="draft data", unit="sample")
    eng = llm.engine
    with open(path, "a") as f:
        for start in range(0, len(todo), cfg.batch_size):
            chunk = todo[start:start + cfg.batch_size]
            params = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    top_p=cfg.top_p)
            req_ids = {eng.add_request(j[3], params): j for j in chunk}
            rows, feats = [], []
            while eng.has_unfinished():
                for res in eng.step():
                    if not res.finished:
                        continue
                    key, name, split, ids = req_ids[res.req_id]
                    rows.append({"key": key, "dataset": name, "split": split, "prompt_ids": ids,
                                 "response_ids": res.token_ids, "finish_reason": res.finish_reason})
                    if recorder is not None:
                        feats.append(recorder.pop(res.req_id))
                    bar.update(1)
            if writer is not None:
                writer.write(rows, feats, eng.model.norm)
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.flush()
    bar.close()
    return path
