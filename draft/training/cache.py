"""Target cache: hidden states of the chosen target layers (and the final normed hidden state,
from which target logits are recomputed with the shared LM head) for every generated sequence.

`build_cache` rebuilds it from token ids alone (the committed token file or a responses file):
one prefill pass of each whole sequence through our engine, with `FeatureRecorder` (an engine
drafter that proposes nothing) capturing the features. Stored as bf16 torch shards that load
memory-mapped (a cache of millions of positions is tens of GB: training reads only the rows
it samples), with a `manifest.json` that lists finished shards only (the resume point).
The last cached layer must be the target's last layer: `final` = final_norm(its output).
A shard holds whole sequences, concatenated:
`features` [T, len(layers) * hidden], `final` [T, hidden], `token_ids` [T], `offsets` [n + 1].
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from draft.base import EMPTY_PROPOSAL, Drafter, DraftInput, Proposal

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DEFAULT_CACHE_LAYERS = (1, 8, 15, 22, 29)


@dataclass(slots=True)
class Sequence:
    key: str
    split: str
    num_prompt_tokens: int
    token_ids: torch.Tensor  # [T] int64
    cached_features: torch.Tensor  # [T, F_cache] bf16, memory-mapped
    final: torch.Tensor  # [T, hidden] bf16
    dataset: str = ""
    columns: torch.Tensor | None = None  # of the requested layers in F_cache (None: all)

    @property
    def features(self) -> torch.Tensor:
        """[T, F] the requested layers' features (read from the shard on access)."""
        f = self.cached_features
        return f if self.columns is None else f.index_select(1, self.columns)


class FeatureRecorder(Drafter):
    """A drafter that proposes nothing and records, per request, the context features the
    engine hands it: the target's chosen-layer hidden states at every position that entered
    the KV cache, captured during generation itself (no second pass over the data)."""

    name = "recorder"
    num_draft_tokens = 0

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.target_layers = tuple(layers)
        self.features: dict[str, list[torch.Tensor]] = {}
        self.lengths: dict[str, int] = {}

    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        for x in inputs:
            m = x.context_features.shape[0]
            start = x.num_computed_tokens - m
            assert x.req_id in self.features or start == 0, \
                "features start past position 0 (a prefix-cache hit): record with prefix caching off"
            chunks = self.features.setdefault(x.req_id, [])
            if start < self.lengths.get(x.req_id, 0):  # preempted and recomputed: start over
                assert start == 0
                chunks.clear()
            chunks.append(x.context_features.to("cpu", torch.bfloat16))
            self.lengths[x.req_id] = x.num_computed_tokens
        return [EMPTY_PROPOSAL] * len(inputs)

    def pop(self, req_id: str) -> torch.Tensor:
        """[T, F] features of positions 0..T-1 (every token but the last sampled one)."""
        self.lengths.pop(req_id, None)
        return torch.cat(self.features.pop(req_id))

    def free(self, req_id: str) -> None:
        pass  # the generation loop pops finished requests itself


class CacheWriter:
    """Appends whole sequences to bf16 shards; the manifest lists finished shards only."""

    def __init__(self, cache_dir: str | Path, layers: tuple[int, ...], hidden_size: int) -> None:
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest = load_manifest(self.dir) or {"target_layers": list(layers),
                                                    "hidden_size": hidden_size, "shards": []}
        if tuple(self.manifest["target_layers"]) != tuple(layers):
            raise ValueError(f"{self.dir} caches layers {self.manifest['target_layers']}, not {list(layers)}")

    def done_keys(self) -> set[str]:
        return {k for s in self.manifest["shards"] for k in s["keys"]}

    def write(self, rows: list[dict], features: list[torch.Tensor], final_norm) -> None:
        """`rows` as in responses.jsonl; features[i] covers every token of row i."""
        if not rows:
            return
        layer_last = len(self.manifest["target_layers"]) - 1
        hidden = self.manifest["hidden_size"]
        ids = [torch.tensor(r["prompt_ids"] + r["response_ids"]) for r in rows]
        assert all(len(i) == f.shape[0] for i, f in zip(ids, features))
        offsets = torch.tensor([0] + [len(i) for i in ids]).cumsum(0)
        feats = torch.cat(features)
        with torch.no_grad():
            last = feats[:, layer_last * hidden:(layer_last + 1) * hidden]
            final = final_norm(last.to(final_norm.weight.dtype)).to(torch.bfloat16)
        name = f"shard-{len(self.manifest['shards']):05d}.pt"
        torch.save({"token_ids": torch.cat(ids).to(torch.int32), "offsets": offsets,
                    "features": feats.contiguous(), "final": final.contiguous()}, self.dir / name)
        self.manifest["shards"].append({
            "file": name, "keys": [r["key"] for r in rows], "splits": [r["split"] for r in rows],
            "datasets": [r["dataset"] for r in rows],
            "num_prompt_tokens": [len(r["prompt_ids"]) for r in rows],
            "num_tokens": int(offsets[-1])})
        (self.dir / MANIFEST).write_text(json.dumps(self.manifest))  # after the shard: resumable


def load_manifest(cache_dir: str | Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def load_sequences(cache_dir: str | Path, split: str | None = None,
                   layers: tuple[int, ...] | None = None) -> list[Sequence]:
    """All cached sequences (of one split), with features restricted to `layers` if given."""
    cache = Path(cache_dir)
    manifest = load_manifest(cache)
    if manifest is None:
        raise FileNotFoundError(f"no target cache in {cache} (run `dspark draft data` first)")
    cached = list(manifest["target_layers"])
    hidden = manifest["hidden_size"]
    cols = None
    if layers is not None and tuple(layers) != tuple(cached):
        missing = [i for i in layers if i not in cached]
        if missing:
            raise ValueError(f"target layers {missing} are not in the cache ({cached})")
        cols = torch.cat([torch.arange(hidden) + cached.index(i) * hidden for i in layers])
    out = []
    for shard in manifest["shards"]:
        tensors = torch.load(cache / shard["file"], mmap=True, weights_only=True)
        feats = tensors["features"]
        offsets = tensors["offsets"].tolist()
        for j, key in enumerate(shard["keys"]):
            if split is not None and shard["splits"][j] != split:
                continue
            a, b = offsets[j], offsets[j + 1]
            out.append(Sequence(key, shard["splits"][j], shard["num_prompt_tokens"][j],
                                tensors["token_ids"][a:b].long(), feats[a:b], tensors["final"][a:b],
                                shard["datasets"][j], cols))
    return out


def build_cache(rows: list[dict], cache_dir: str | Path, model: str | None = None,
                layers: tuple[int, ...] = DEFAULT_CACHE_LAYERS, dtype: str = "bfloat16",
                batch_size: int = 32, shard_tokens: int = 200_000) -> Path:
    """Prefill every row's prompt + response through the target and cache its features; rows
    already in the cache are skipped (resume). Returns the cache directory."""
    from engine import LLM, SamplingParams

    recorder = FeatureRecorder(layers)
    # no prefix caching: a cached prefix would skip the forward that captures its features
    llm = LLM(model=model, dtype=dtype, max_num_seqs=batch_size, max_num_batched_tokens=4096,
              drafter=recorder, enable_prefix_caching=False)
    eng = llm.engine
    if layers[-1] != eng.arch.num_layers - 1:
        raise ValueError(f"the last cached layer must be the target's last ({eng.arch.num_layers - 1})")
    writer = CacheWriter(cache_dir, layers, eng.arch.hidden_size)
    done = writer.done_keys()
    todo = [r for r in rows if r["key"] not in done]
    logger.info("%d sequences in all, %d already cached", len(rows), len(rows) - len(todo))
    lengths = {r["key"]: len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows}
    bar = tqdm(total=sum(lengths.values()), initial=sum(lengths[k] for k in lengths if k in done),
               desc="draft cache", unit="tok")
    params = SamplingParams(max_tokens=1, temperature=0.0)
    pending = list(reversed(todo))
    in_flight: dict[str, dict] = {}
    rows_out, feats_out, num = [], [], 0
    while pending or in_flight:
        while pending and len(in_flight) < batch_size:
            row = pending.pop()
            in_flight[eng.add_request(row["prompt_ids"] + row["response_ids"], params)] = row
        for res in eng.step():
            if res.finished:
                row = in_flight.pop(res.req_id)
                rows_out.append(row)
                feats_out.append(recorder.pop(res.req_id))
                num += feats_out[-1].shape[0]
                bar.update(feats_out[-1].shape[0])
        if num >= shard_tokens or (not pending and not in_flight):
            writer.write(rows_out, feats_out, eng.model.norm)
            rows_out, feats_out, num = [], [], 0
    bar.close()
    return Path(cache_dir)
