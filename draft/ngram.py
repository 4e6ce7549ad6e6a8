"""Prompt lookup (n-gram) drafting: find the latest earlier occurrence of the last n tokens
(n from max_n down to min_n) in the request's own prompt and output, propose what followed."""

import numpy as np

from draft.base import EMPTY_PROPOSAL, Drafter, DraftInput, Proposal


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, num_draft_tokens: int, min_n: int = 1, max_n: int = 4) -> None:
        assert 1 <= min_n <= max_n and num_draft_tokens >= 1
        self.num_draft_tokens = num_draft_tokens
        self.min_n, self.max_n = min_n, max_n

    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        return [self._propose_one(np.asarray(x.token_ids, dtype=np.int64), self.num_positions([x]))
                if x.wants_proposal else EMPTY_PROPOSAL for x in inputs]

    def _propose_one(self, tokens: np.ndarray, limit: int) -> Proposal:
        total = len(tokens)
        for n in range(min(self.max_n, total - 1), self.min_n - 1, -1):
            suffix = tokens[total - n:]
            # windows[i] = tokens[i:i+n] for every start i before the suffix itself
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:total - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n  # the most recent match tends to continue best
                follow = tokens[start:start + limit]
                if follow.size:
                    return Proposal(follow.tolist())
        return EMPTY_PROPOSAL
