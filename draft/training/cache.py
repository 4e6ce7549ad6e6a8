"""Target cache: hidden states of the chosen target layers (and the final normed hidden state,
from which target logits are recomputed with the shared LM head) for every generated sequence.

They are captured while the target generates the responses (`FeatureRecorder`, an engine
drafter that proposes nothing), so the cache costs no second forward pass. Stored in bf16
safetensors shards with a `manifest.json` that lists finished shards only (resume point).
The last cached layer must be the target's last layer: `final` = final_norm(its output).
A shard holds whole sequences, concatenated:
`features` [T, len(layers) * hidden], `final` [T, hidden], `token_ids` [T], `offsets` [n + 1].
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
    features: torch.Tensor  # [T, F] bf16
    final: torch.Tensor  # [T, hidden] bf16
    dataset: str = ""


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
        """`rows` as in responses.jsonl; features[i] covers the first len(features[i]) tokens."""
        if not rows:
            return
        layer_last = len(self.manifest["target_layers"]) - 1
        hidden = self.manifest["hidden_size"]
        ids = [torch.tensor((r["prompt_ids"] + r["response_ids"])[:f.shape[0]]) for r, f in zip(rows, features)]
        offsets = torch.tensor([0] + [len(i) for i in ids]).cumsum(0)
        feats = torch.cat(features)
        with torch.no_grad():
            last = feats[:, layer_last * hidden:(layer_last + 1) * hidden]
            final = final_norm(last.to(final_norm.weight.dtype)).to(torch.bfloat16)
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        save_file({"token_ids": torch.cat(ids).to(torch.int32), "offsets": offsets,
                   "features": feats.contiguous(), "final": final.contiguous()}, str(self.dir / name))
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
        tensors = load_file(str(cache / shard["file"]))
        feats = tensors["features"] if cols is None else tensors["features"].index_select(1, cols)
        offsets = tensors["offsets"].tolist()
        for j, key in enumerate(shard["keys"]):
            if split is not None and shard["splits"][j] != split:
                continue
            a, b = offsets[j], offsets[j + 1]
            out.append(Sequence(key, shard["splits"][j], shard["num_prompt_tokens"][j],
                                tensors["token_ids"][a:b].long(), feats[a:b], tensors["final"][a:b],
                                shard["datasets"][j]))
    return out
