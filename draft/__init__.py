"""Drafters for speculative decoding; see draft/base.py for the interface."""

from draft.base import EMPTY_PROPOSAL, Drafter, DraftInput, Proposal, TargetHandle
from draft.ngram import NgramDrafter


def make_drafter(name: str, num_draft_tokens: int, target: TargetHandle) -> Drafter:
    """A drafter by name for the given target model: "ngram", a shipped learned drafter
    ("dspark", "dflash", "eagle3", "mtp": draft/checkpoints/<name>/), or a checkpoint directory."""
    if name == "ngram":
        return NgramDrafter(num_draft_tokens)
    from draft.checkpoint import SHIPPED_DIR, load_model, resolve

    path = resolve(name)
    if path is None:
        shipped = sorted(p.name for p in SHIPPED_DIR.glob("*") if (p / "config.json").is_file())
        raise ValueError(f"unknown drafter {name!r}; available: ngram, {', '.join(shipped)} or a "
                         "checkpoint directory")
    return load_model(path, target).make_drafter(num_draft_tokens)


__all__ = ["EMPTY_PROPOSAL", "DraftInput", "Drafter", "NgramDrafter", "Proposal", "TargetHandle",
           "make_drafter"]
