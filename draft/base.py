"""The drafter interface: given the requests of a step, propose draft tokens for each."""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class DraftInput:
    """What a drafter sees of one request after a step: its committed token ids (prompt and
    output, the step's new tokens included) and how many of them the target's KV now holds."""

    req_id: str
    token_ids: list[int]
    num_computed_tokens: int


@dataclass(slots=True)
class Proposal:
    """Up to γ draft tokens for one request.

    `draft_probs` [len, vocab] are the distributions the tokens were drawn from (None for a
    deterministic drafter: one-hot on each token). `confidences` estimate, per position, the
    probability that the token is accepted given all earlier ones were.
    """

    draft_token_ids: list[int]
    draft_probs: torch.Tensor | None = None
    confidences: list[float] | None = None

    def __len__(self) -> int:
        return len(self.draft_token_ids)


EMPTY_PROPOSAL = Proposal([])


class Drafter(ABC):
    """Drafters may keep per-request state; the engine tells them what ended."""

    name: str
    num_draft_tokens: int

    @abstractmethod
    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        """One proposal per input, in order (possibly empty)."""

    def free(self, req_id: str) -> None:  # noqa: B027 - stateless drafters keep nothing
        """Forget a finished or preempted request."""
