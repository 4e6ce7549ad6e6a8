"""Draft vocabulary: the tokens a drafter may propose (EAGLE-3 / FR-Spec style).

A draft over the full 49k vocabulary spends most of its time in the LM head, the softmax and
the sampling of each position; the target's answers use far fewer tokens. The `size` most
frequent tokens of the target's training sequences are stored in a checkpoint (`draft_vocab`
ids in model.safetensors, `draft_vocab_size` in config.json): the trainer picks them before
training (logits are then computed over them only), and `set_draft_vocab` changes them on a
trained checkpoint. Drafts stay lossless: the drafter reports the restricted distribution it
really sampled from; tokens outside it can only cost acceptance (`coverage`: the share of
held-out response tokens inside).
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from draft.training.cache import Sequence, load_sequences


def _counts(seqs: list[Sequence], vocab_size: int, prompts: bool) -> torch.Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in seqs:
        ids = s.token_ids if prompts else s.token_ids[s.num_prompt_tokens:]
        counts += torch.bincount(ids.long(), minlength=vocab_size)
    return counts


def top_tokens(train: list[Sequence], heldout: list[Sequence], size: int, vocab_size: int
               ) -> tuple[torch.Tensor, float | None]:
    """The `size` most frequent token ids (sorted) of the train sequences' prompts and
    responses (answers reuse their prompts' names, numbers and identifiers), ties and unseen
    tokens by lower id (BPE merges come roughly in frequency order); and the fraction of
    held-out response tokens they cover (None without held-out sequences)."""
    counts = _counts(train, vocab_size, prompts=True)
    if not counts.sum():
        raise ValueError("no training sequences to count tokens of")
    score = counts.double() * vocab_size - torch.arange(vocab_size, dtype=torch.float64)
    ids = score.topk(min(size, vocab_size)).indices.sort().values
    held = _counts(heldout, vocab_size, prompts=False)
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
        cache = Path(data_dir) / "cache"
        ids, coverage = top_tokens(load_sequences(cache, "train"), load_sequences(cache, "heldout"),
                                   size, cfg["vocab_size"])
        tensors["draft_vocab"] = ids
        report["coverage"] = cfg["draft_vocab_coverage"] = coverage
    else:
        cfg.pop("draft_vocab_coverage", None)
    cfg["draft_vocab_size"] = size
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    return report
