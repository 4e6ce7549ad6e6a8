"""Turns committed token ids into text: incremental detokenisation, stop strings, deltas."""

import time
from dataclasses import dataclass, field

from engine.tokenizer import Tokenizer
from scheduler import RequestUpdate, TokenLogprob
from scheduler.outputs import PREDICTION_SOURCE


@dataclass(slots=True)
class RequestOutput:
    """The state of one request after a step; `delta_*` is what is new since the last one."""

    req_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    delta_token_ids: list[int]
    delta_text: str
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    # When the scheduler first admitted the request (end of its queue time); set by LLMEngine.
    first_scheduled_time: float | None = None
    num_spec_rounds: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Predicted Outputs: the prediction's draft tokens verified and accepted / rejected
    num_prediction_accepted_tokens: int = 0
    num_prediction_rejected_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # one per token of `token_ids` / `delta_token_ids`, when the request asked for logprobs
    logprobs: list[TokenLogprob] | None = None
    delta_logprobs: list[TokenLogprob] | None = None
    # SamplingParams.prompt_logprobs: one per prompt token (the first None), in every output
    # from the first token on
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(slots=True)
class _RequestState:
    req_id: str
    prompt_token_ids: list[int]
    stop: list[str]
    arrival_time: float
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent_text_len: int = 0
    sent_token_len: int = 0
    first_token_time: float | None = None
    num_spec_rounds: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_prediction_accepted_tokens: int = 0
    num_prediction_rejected_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add_request(self, req_id: str, prompt_token_ids: list[int], stop: list[str],
                    arrival_time: float, logprobs: bool = False) -> None:
        self._states[req_id] = _RequestState(req_id, prompt_token_ids, stop, arrival_time,
                                             logprobs=[] if logprobs else None)

    def knows(self, req_id: str) -> bool:
        return req_id in self._states

    def remove(self, req_id: str) -> None:
        self._states.pop(req_id, None)

    def process(self, update: RequestUpdate) -> tuple[RequestOutput, bool]:
        """Apply one scheduler update. Returns the output and whether a stop string ended it
        (the caller must then finish the request in the scheduler)."""
        st = self._states[update.req_id]
        now = time.monotonic()
        if update.new_token_ids and st.first_token_time is None:
            st.first_token_time = now
        st.num_cached_tokens = update.num_cached_tokens
        if update.prompt_logprobs is not None:
            st.prompt_logprobs = update.prompt_logprobs
        if update.num_draft_tokens:
            st.num_spec_rounds += 1
            st.num_draft_tokens += update.num_draft_tokens
            st.num_accepted_tokens += update.num_accepted_tokens
            if update.draft_source == PREDICTION_SOURCE:
                st.num_prediction_accepted_tokens += update.num_accepted_tokens
                st.num_prediction_rejected_tokens += update.num_draft_tokens - update.num_accepted_tokens
        hit = None
        if st.stop:
            # One token at a time: a stop string inside an accepted run ends the output there.
            for k, token_id in enumerate(update.new_token_ids):
                st.token_ids.append(token_id)
                if st.logprobs is not None and update.logprobs is not None:
                    st.logprobs.append(update.logprobs[k])
                st.text = self.tokenizer.decode(st.token_ids)
                hit = self._find_stop(st)
                if hit is not None:
                    break
        else:
            st.token_ids.extend(update.new_token_ids)
            if st.logprobs is not None and update.logprobs is not None:
                st.logprobs.extend(update.logprobs)
            st.text = self.tokenizer.decode(st.token_ids)
        finish_reason, stop_reason = update.finish_reason, None
        if hit is not None:
            idx, stop_reason = hit
            st.text = st.text[:idx]
            finish_reason = "stop"
        finished = finish_reason is not None
        # Hold back an incomplete UTF-8 character or a possible start of a stop string.
        end = len(st.text) if finished else self._safe_end(st)
        delta_text = st.text[st.sent_text_len:end]
        st.sent_text_len = max(st.sent_text_len, end)
        delta_ids = st.token_ids[st.sent_token_len:]
        delta_logprobs = None if st.logprobs is None else st.logprobs[st.sent_token_len:]
        st.sent_token_len = len(st.token_ids)
        out = RequestOutput(
            req_id=st.req_id, prompt_token_ids=st.prompt_token_ids, token_ids=list(st.token_ids),
            text=st.text, delta_token_ids=delta_ids, delta_text=delta_text, finished=finished,
            finish_reason=finish_reason, stop_reason=stop_reason, arrival_time=st.arrival_time,
            first_token_time=st.first_token_time, finished_time=now if finished else None,
            num_spec_rounds=st.num_spec_rounds, num_draft_tokens=st.num_draft_tokens,
            num_accepted_tokens=st.num_accepted_tokens,
            num_prediction_accepted_tokens=st.num_prediction_accepted_tokens,
            num_prediction_rejected_tokens=st.num_prediction_rejected_tokens,
            num_cached_tokens=st.num_cached_tokens,
            logprobs=None if st.logprobs is None else list(st.logprobs), delta_logprobs=delta_logprobs,
            prompt_logprobs=st.prompt_logprobs,
        )
        if finished:
            del self._states[st.req_id]
        return out, hit is not None

    @staticmethod
    def _find_stop(st: _RequestState) -> tuple[int, str] | None:
        if not st.stop:
            return None
        # A stop string can only start in text not yet streamed, or overlap its end.
        longest = max(len(s) for s in st.stop)
        start = max(0, st.sent_text_len - longest + 1)
        best: tuple[int, str] | None = None
        for s in st.stop:
            i = st.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    @staticmethod
    def _safe_end(st: _RequestState) -> int:
        end = len(st.text)
        while end > st.sent_text_len and st.text[end - 1] == "\ufffd":
            end -= 1
        for s in st.stop:
            for k in range(min(len(s) - 1, end - st.sent_text_len), 0, -1):
                if st.text[end - k:end] == s[:k]:
                    end -= k
                    break
        return max(end, st.sent_text_len)
