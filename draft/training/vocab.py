"""Draft vocabulary: the tokens a drafter may propose at inference (EAGLE-3 / FR-Spec style).

A draft over the full 49k vocabulary spends most of its time in the LM head, the softmax and
the sampling of each position; the target's answers use far fewer tokens. `set_draft_vocab`
stores the `size` most frequent tokens of the target's training responses in a checkpoint
(`draft_vocab` ids in model.safetensors, `draft_vocab_size` in config.json). Drafts stay
lossless: the drafter reports the restricted distribution it really sampled from; tokens
outside it can only cost acceptance (`coverage`: the share of held-out response tokens inside).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from draft.training.data import read_responses


def _counts(rows: list[dict], vocab_size: int, keys: tuple[str, ...]) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for row in rows:
        for key in keys:
            counts += torch.bincount(torch.tensor(row[key], dtype=torch.long), minlength=vocab_size)
    return counts


def top_tokens(data_dir: str | Path, size: int, vocab_size: int) -> tuple[torch.Tensor, float | None]:
    """The `size` most frequent token ids (sorted) of the train split's prompts and responses
    (answers reuse their prompts' names, numbers and identifiers), ties and unseen tokens by
    lower id (BPE merges come roughly in frequency order); and the fraction of held-out
    response tokens they cover (None without a held-out split)."""
    train = _counts(read_responses(data_dir, split="train"), vocab_size, ("prompt_ids", "response_ids"))
    if not train.sum():
        raise ValueError(f"no training responses in {data_dir}")
    score = train.double() * vocab_size - torch.arange(vocab_size, dtype=torch.float64)
    ids = score.topk(min(size, vocab_size)).indices.sort().values
    held = _counts(read_responses(data_dir, split="heldout"), vocab_size, ("response_ids",))
    return ids, float(held[ids].sum() / held.sum()) if held.sum() else None


def set_draft_vocab(ckpt_dir: str | Path, data_dir: str | Path, size: int) -> dict:
    """Write the draft vocabulary into a checkpoint (size 0 removes it); report its held-out
    coverage."""
    from draft.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    path = Path(ckpt_dir)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    tensors = load_file(str(path / WEIGHTS_FILE))
    tensors.pop("draft_vocab", None)
    report = {"checkpoint": str(path), "draft_vocab_size": size}
    if size:
        ids, coverage = top_tokens(data_dir, size, cfg["vocab_size"])
        tensors["draft_vocab"] = ids
        report["coverage"] = cfg["draft_vocab_coverage"] = coverage
    else:
        cfg.pop("draft_vocab_coverage", None)
    cfg["draft_vocab_size"] = size
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return report
