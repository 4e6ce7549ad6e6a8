"""Drafters for speculative decoding; see draft/base.py for the interface."""

from draft.base import EMPTY_PROPOSAL, DraftInput, Drafter, Proposal
from draft.ngram import NgramDrafter


def make_drafter(name: str, num_draft_tokens: int) -> Drafter:
    if name == "ngram":
        return NgramDrafter(num_draft_tokens)
    raise ValueError(f"unknown drafter {name!r}; available: ngram")


__all__ = ["EMPTY_PROPOSAL", "DraftInput", "Drafter", "NgramDrafter", "Proposal", "make_drafter"]
