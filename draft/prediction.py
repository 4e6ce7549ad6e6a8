"""Predicted Outputs (OpenAI's `prediction`): the text a request expects back is a draft source.

A code edit returns mostly the code it was given. The prediction's token ids are followed as
the output grows: while the output keeps to the prediction, the next tokens of the prediction
are the draft; where it departs (the edit), the prediction is re-aligned on the output's latest
n-gram, preferring the match nearest to where it left off (code repeats lines). The drafts are
verified like any others, so the output is exactly what it would be without a prediction.

`PredictionDrafter` wraps the engine's own drafter (or none): a request with a prediction gets
whichever proposal has the longer expected accepted run, judged by confidences (the
prediction's is the share of its tokens the output has followed so far); where the prediction
alone expects more than the drafter could propose, the drafter's pass is skipped.
"""

from dataclasses import dataclass, replace

import numpy as np

from draft.base import EMPTY_PROPOSAL, Drafter, DraftInput, Proposal
from scheduler.outputs import PREDICTION_SOURCE as SOURCE

# Prediction drafts cost nothing to make, so propose more of them than a learned drafter does;
# the verify policy still decides how many to verify.
PREDICTION_DRAFT_TOKENS = 16
MAX_NGRAM = 8
# the prediction's confidence: a running rate of output tokens that followed it, starting
# high (a user predicts what they expect back) and moving this much toward each new token's
# outcome: after an edit drafts are shorter for a while, and a prediction the output stopped
# following fades out over some 20 tokens (a rejected draft token costs a few percent of a
# forward at low load; the rate and the survival bar below were tuned on `dspark bench predicted`)
PRIOR_CONFIDENCE = 0.95
CONFIDENCE_RATE = 0.05
# propose the positions whose survival (confidence ** k) stays above this: a policy that
# verifies every draft then spends little on a prediction the output does not follow
MIN_SURVIVAL = 0.1
# a proposal without confidences (a drafter that gives none) is valued at this rate per position
DEFAULT_CONFIDENCE = 0.5


@dataclass(slots=True)
class _Alignment:
    """Where a request's output stands in its prediction: `cursor` is the index of the
    prediction token expected next (None: lost until an n-gram matches again)."""

    prediction: np.ndarray
    cursor: int | None = 0
    num_seen: int = 0  # output tokens already folded in
    confidence: float = PRIOR_CONFIDENCE

    def advance(self, output: list[int]) -> None:
        """Fold in the output tokens committed since the last call."""
        for end in range(self.num_seen + 1, len(output) + 1):
            t = output[end - 1]
            if self.cursor is not None and self.cursor < len(self.prediction) and self.prediction[self.cursor] == t:
                self.cursor += 1
                self.confidence += CONFIDENCE_RATE * (1.0 - self.confidence)
            else:
                self.confidence -= CONFIDENCE_RATE * self.confidence
                self.cursor = self._realign(np.asarray(output[max(0, end - MAX_NGRAM):end], dtype=np.int64), end)
        self.num_seen = len(output)

    def _realign(self, recent: np.ndarray, num_output: int) -> int | None:
        """Index after the longest n-gram ending the output (`recent`: its last tokens) found
        in the prediction, the match nearest to where the alignment was (ties: the later)."""
        pred = self.prediction
        last = num_output if self.cursor is None else self.cursor
        for n in range(min(len(recent), len(pred)), 0, -1):
            windows = np.lib.stride_tricks.sliding_window_view(pred, n)
            ends = np.flatnonzero((windows == recent[len(recent) - n:]).all(axis=1)) + n
            if ends.size:
                return int(ends[np.argmin(np.abs(ends - last) - 0.5 * (ends >= last))])
        return None

    def draft(self, limit: int) -> list[int]:
        if self.cursor is None:
            return []
        worth = limit if self.confidence > 0.999 else int(np.log(MIN_SURVIVAL) / np.log(self.confidence))
        return self.prediction[self.cursor:self.cursor + min(limit, worth)].tolist()


def expected_run(proposal: Proposal) -> float:
    """Expected accepted tokens of a proposal: Σ_k Π_{j<=k} c_j."""
    if not len(proposal):
        return 0.0
    conf = proposal.confidences or [DEFAULT_CONFIDENCE] * len(proposal)
    return float(np.cumprod(conf).sum())


class PredictionDrafter(Drafter):
    """The engine's drafter (`base`, or None for plain decoding) plus each request's prediction."""

    name = SOURCE

    def __init__(self, base: Drafter | None, num_prediction_tokens: int = PREDICTION_DRAFT_TOKENS) -> None:
        self.base = base
        self.num_prediction_tokens = num_prediction_tokens
        self.num_draft_tokens = max(num_prediction_tokens, base.num_draft_tokens if base else 0)
        self.target_layers = base.target_layers if base else ()
        self.gives_confidences = base.gives_confidences if base else False
        self._alignments: dict[str, _Alignment] = {}

    @property
    def last_pass_seconds(self) -> float | None:  # type: ignore[override]
        return self.base.last_pass_seconds if self.base else None

    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        mine = [self._propose_one(x) if x.prediction is not None and x.wants_proposal else EMPTY_PROPOSAL
                for x in inputs]
        if self.base is None:
            return mine
        # The base drafter drafts where it would without predictions (its budget), except where
        # the prediction's expected run beats any proposal it could make (at most γ): its
        # pass is then saved, and it only takes in the context.
        base_inputs = [replace(x, wants_proposal=False)
                       if x.prediction is not None and (x.max_draft_tokens == 0
                                                        or expected_run(m) >= self.base.num_draft_tokens)
                       else x for x, m in zip(inputs, mine)]
        out = [replace(p, source=p.source or self.base.name) for p in self.base.propose(base_inputs)]
        return [m if expected_run(m) > expected_run(p) else p for m, p in zip(mine, out)]

    def _propose_one(self, x: DraftInput) -> Proposal:
        assert x.prediction is not None
        align = self._alignments.get(x.req_id)
        if align is None:
            align = self._alignments[x.req_id] = _Alignment(np.asarray(x.prediction, dtype=np.int64))
        align.advance(x.token_ids[len(x.token_ids) - x.num_output_tokens:])
        tokens = align.draft(self.num_prediction_tokens)
        if not tokens:
            return EMPTY_PROPOSAL
        return Proposal(tokens, None, [align.confidence] * len(tokens), SOURCE)

    def free(self, req_id: str) -> None:
        self._alignments.pop(req_id, None)
        if self.base is not None:
            self.base.free(req_id)
