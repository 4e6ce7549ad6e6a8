"""Structured outputs: token masks from a grammar (llguidance), exact under speculation.

A constrained request's matcher follows its committed tokens. Each step it fills one mask row
per logits row the request owns: the row of its next token and, when it verifies drafts, the
row after each draft, with the grammar state advanced along the drafts (and not committed).
The sampler sets masked logits to -inf before anything else, so every row is the distribution
constrained plain decoding would sample at that position: a draft the grammar forbids has
target probability 0 and is rejected exactly there, and verification stays lossless.

llguidance over xgrammar (`dspark bench grammar`, bench/results/grammar-*.json): xgrammar's
masks are ~3x faster, but at 32 requests x 8 verify rows both stay a few ms against a step
of ~100 ms; llguidance compiles a schema ~9x faster (a new schema is on the TTFT path), has
the draft-row call built in, and installs in 8 MB where xgrammar pulls ~1 GB of triton.
"""

import logging
import re
from dataclasses import dataclass

import llguidance
import llguidance.torch as llt
import torch

from engine.tokenizer import Tokenizer
from scheduler import InvalidRequest, StructuredOutput

logger = logging.getLogger(__name__)


# JSON as json.dumps writes it: free whitespace lets small models pad an object forever
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar of a request's constraint."""
    if spec.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_LAYOUT)
    if spec.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_LAYOUT)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec.value)
    if spec.kind == "choice":
        choices = spec.choices
        return llguidance.LLMatcher.grammar_from_regex("|".join(f"({re.escape(c)})" for c in choices))
    raise ValueError(f"unknown structured output kind {spec.kind!r}")


class GrammarCompiler:
    """The model's vocabulary as llguidance sees it (built once: ~1 s), and grammar checks."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=sorted(tokenizer.eos_token_ids))

    def check(self, spec: StructuredOutput) -> None:
        """Raise InvalidRequest (400, naming the request's field) if the grammar cannot compile."""
        try:
            grammar = grammar_text(spec)
        except (ValueError, RuntimeError, TypeError) as e:
            raise InvalidRequest(f"invalid {spec.kind.replace('_', ' ')}: {e}", spec.field) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise InvalidRequest(f"the {spec.kind.replace('_', ' ')} cannot be compiled: {messages[0]}", spec.field)

    def matcher(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, grammar_text(spec))


@dataclass(slots=True)
class MaskedRequest:
    """One constrained request of a step: its logits rows start at `row`; `drafts` are verified."""

    req_id: str
    spec: StructuredOutput
    row: int
    drafts: list[int]


class GrammarMasks:
    """Matchers of the running constrained requests (physical state, like draft distributions)."""

    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._executor = llguidance.LLExecutor()
        self._matchers: dict[str, llguidance.LLMatcher] = {}

    def masks(self, requests: list[MaskedRequest], num_rows: int) -> torch.Tensor:
        """Allowed-token masks [num_rows, vocab] (bool) for the logits of one step; rows of
        unconstrained requests allow everything."""
        bitmask = llt.allocate_token_bitmask(num_rows, self.compiler.vocab_size)
        bitmask.fill_(-1)  # all bits set: unconstrained rows
        plain = [(self._matcher(r), r.row) for r in requests if not r.drafts]
        drafted = [(self._matcher(r), r.row, r.drafts) for r in requests if r.drafts]
        if plain:
            llt.fill_next_token_bitmask_par(self._executor, plain, bitmask)
        if drafted:  # the rows after each draft too, the matcher advanced along it and back
            llt.fill_next_token_bitmask_par_with_draft_tokens(self._executor, drafted, bitmask)
        allowed = unpack(bitmask, self.compiler.vocab_size)
        # rows past a draft the grammar refuses come back empty; they are never sampled
        # (verification rejects that draft first), so let them be anything but NaN
        allowed[~allowed.any(dim=-1)] = True
        return allowed

    def commit(self, req_id: str, token_ids: list[int]) -> None:
        m = self._matchers.get(req_id)
        if m is None or m.is_stopped() or not token_ids:
            return  # a finished grammar only lets EOS through, which ends the request
        if not m.consume_tokens(token_ids) and not m.is_stopped():
            logger.warning("structured output of %s left its grammar: %s", req_id, m.get_error())

    def free(self, req_id: str) -> None:
        self._matchers.pop(req_id, None)

    def _matcher(self, r: MaskedRequest) -> llguidance.LLMatcher:
        m = self._matchers.get(r.req_id)
        if m is None:
            m = self._matchers[r.req_id] = self.compiler.matcher(r.spec)
        return m


_BITS = torch.arange(32, dtype=torch.int32)


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 bitmask [N, ceil(V / 32)] -> bool [N, V] (bit b of word w: token 32 w + b)."""
    bits = (bitmask[:, :, None] >> _BITS) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
