"""Drafters for speculative decoding; see draft/base.py for the interface."""

from draft.base import EMPTY_PROPOSAL, DraftInput, Drafter, Proposal, TargetHandle
from draft.ngram import NgramDrafter


def make_drafter(name: str, num_draft_tokens: int, target: TargetHandle) -> Drafter:
    """A drafter by name ("ngram") for the given target model."""
    if name == "ngram":
        return NgramDrafter(num_draft_tokens)
    raise ValueError(f"unknown drafter {name!r}; available: ngram")


__all__ = ["EMPTY_PROPOSAL", "DraftInput", "Drafter", "NgramDrafter", "Proposal", "TargetHandle",
           "make_drafter"]
