"""Structured outputs on the tiny byte-level model: outputs follow the grammar, and speculation
stays exact: a drafter proposing the unconstrained continuation gets its refused drafts
rejected where the grammar refuses them (greedy and seeded outputs equal plain decoding's)."""

import json

import pytest
import torch

from draft import Drafter, DraftInput, Proposal
from engine import InvalidRequest, SamplingParams, StructuredOutput
from engine.grammar import GrammarCompiler, GrammarMasks, MaskedRequest
from tests.draft.helpers import tiny_llm

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["a", "b", "n"],
          "properties": {"a": {"enum": ["x", "yes"]}, "b": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}}}
JSON_SCHEMA = StructuredOutput("json_schema", json.dumps(SCHEMA))
PROMPTS = [[5, 6, 7], [40, 41, 42, 43], [100, 3]]


def _valid(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"a", "b", "n"} and value["a"] in ("x", "yes") and isinstance(value["b"], bool)
            and isinstance(value["n"], int) and 0 <= value["n"] <= 99)


class UnconstrainedGreedyDrafter(Drafter):
    """Proposes what the target itself would say without the grammar (its unmasked greedy
    continuation): a verifier that skipped the masks of draft rows would accept all of it."""

    name = "self"

    def __init__(self, llm, num_draft_tokens: int) -> None:
        self.llm, self.num_draft_tokens = llm, num_draft_tokens

    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        out = []
        for x in inputs:
            ids = list(x.token_ids)
            for _ in range(self.num_draft_tokens if x.wants_proposal else 0):
                ids.append(int(self.llm.prompt_logits(ids)[-1].argmax()))
            out.append(Proposal(ids[len(x.token_ids):]))
        return out


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return tiny_llm(tiny_model_dir, block_size=4)


def _generate(llm, params):
    return [o.token_ids for o in llm.generate(PROMPTS, params)]


def test_outputs_follow_the_schema_regex_and_choices(plain):
    for params in (SamplingParams(max_tokens=64, temperature=0, structured=JSON_SCHEMA),
                   SamplingParams(max_tokens=64, temperature=1.0, seed=4, structured=JSON_SCHEMA)):
        outs = plain.generate(PROMPTS, params)
        assert all(o.finish_reason == "stop" and _valid(o.text) for o in outs), [o.text for o in outs]
    free = plain.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0))
    assert not any(o.text.startswith("{") for o in free)  # the random model alone writes no JSON
    regex = StructuredOutput("regex", r"[0-9]{3}-[a-z]{2}")
    assert all(len(o.text) == 6 and o.text[3] == "-" for o in
               plain.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=1.0, structured=regex)))
    choice = StructuredOutput("choice", json.dumps(["red", "green", "blue"]))
    assert {o.text for o in plain.generate(PROMPTS * 3, SamplingParams(
        max_tokens=20, temperature=1.0, structured=choice))} <= {"red", "green", "blue"}
    obj = plain.generate(PROMPTS, SamplingParams(max_tokens=48, temperature=0,
                                                 structured=StructuredOutput("json_object")))
    assert all(o.text.startswith("{") for o in obj)


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 11)])
def test_speculation_is_exact_under_the_grammar(tiny_model_dir, plain, temperature, seed):
    params = SamplingParams(max_tokens=64, temperature=temperature, seed=seed, structured=JSON_SCHEMA)
    expected = _generate(plain, params)
    spec = tiny_llm(tiny_model_dir, block_size=4, verify_policy="fixed",
                    drafter=UnconstrainedGreedyDrafter(plain, 4))
    eng = spec.engine
    ids = [eng.add_request(p, params) for p in PROMPTS]
    done = {}
    while eng.has_unfinished():
        done.update({o.req_id: o for o in eng.step() if o.finished})
    outs = [done[i] for i in ids]
    assert [o.token_ids for o in outs] == expected
    assert sum(o.num_draft_tokens for o in outs) > 0
    # the grammar, not the drafter, decided: unconstrained drafts were mostly refused
    assert sum(o.num_accepted_tokens for o in outs) < sum(o.num_draft_tokens for o in outs)


def test_bad_grammars_are_refused_naming_the_field(plain):
    bad = StructuredOutput("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "nope"}}}),
                           field="response_format")
    with pytest.raises(InvalidRequest) as e:
        plain.generate([[5]], SamplingParams(structured=bad))
    assert e.value.param == "response_format"
    with pytest.raises(InvalidRequest):
        plain.generate([[5]], SamplingParams(structured=StructuredOutput("regex", "(unclosed", field="guided_regex")))


def test_rows_after_a_refused_draft_allow_anything(plain):
    eng = plain.engine
    masks = GrammarMasks(GrammarCompiler(eng.tokenizer, eng.arch.vocab_size))
    spec = StructuredOutput("regex", "ab+")
    a, b, z = (eng.tokenizer.encode(c, False)[0] for c in "abz")
    allowed = masks.masks([MaskedRequest("r", spec, 1, [a, z, b])], num_rows=5)
    assert allowed[0].all()  # another request's row
    assert allowed[1].nonzero().flatten().tolist() == [a]  # before the draft "a"
    assert allowed[2, b] and not allowed[2, z]  # after "a": the draft "z" is refused here
    assert allowed[3].all() and allowed[4].all()  # past the refusal: never sampled
    masks.commit("r", [a, b])
    assert masks.masks([MaskedRequest("r", spec, 0, [])], 1)[0, b]


class AbcdDrafter(Drafter):
    """Drafts from its own random, peaked distributions over "abcd": "d" is outside the grammar
    below, so verification must refuse it on every draft row."""

    name = "abcd"

    def __init__(self, token_ids: list[int], num_draft_tokens: int = 3, seed: int = 0) -> None:
        self.ids, self.num_draft_tokens = torch.tensor(token_ids), num_draft_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab_size = 259

    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        n, k = len(inputs), self.num_draft_tokens
        small = (2.5 * torch.randn(n, k, len(self.ids), generator=self.gen)).softmax(-1)
        picks = torch.multinomial(small.view(-1, len(self.ids)), 1, generator=self.gen).view(n, k)
        probs = torch.zeros(n, k, self.vocab_size).index_copy_(2, self.ids, small)
        return [Proposal(self.ids[picks[i]].tolist(), probs[i]) for i in range(n)]


def _grammar_counts(path, drafter, num: int, seed: int):
    import collections

    llm = tiny_llm(path, block_size=4, seed=seed, verify_policy="fixed", drafter=drafter,
                   max_num_seqs=1024, max_num_batched_tokens=8192, num_blocks=4096)
    params = SamplingParams(max_tokens=4, temperature=1.0, structured=StructuredOutput("regex", "[abc]{3}"))
    counts: collections.Counter = collections.Counter()
    eng = llm.engine
    for start in range(0, num, 1000):
        for _ in range(min(1000, num - start)):
            eng.add_request([5, 6, 7], params)
        while eng.has_unfinished():
            counts.update(tuple(o.token_ids[:3]) for o in eng.step() if o.finished)
    return counts


@pytest.mark.slow
def test_constrained_speculative_sampling_is_distributed_as_constrained_plain(tiny_model_dir, monkeypatch):
    from tests.engine.test_speculative_stats import same_distribution_p

    abcd = [int(plain_id) for plain_id in tiny_llm(tiny_model_dir).engine.tokenizer.encode("abcd", False)]
    plain = _grammar_counts(tiny_model_dir, None, 3000, seed=1)
    spec = _grammar_counts(tiny_model_dir, AbcdDrafter(abcd, seed=2), 3000, seed=3)
    assert len(plain) > 20 and sum(spec.values()) == 3000
    assert same_distribution_p(plain, spec) > 0.001
    # masks on the first row only (draft rows unconstrained): the forbidden "d" gets accepted
    masks = GrammarMasks.masks
    monkeypatch.setattr(GrammarMasks, "masks", lambda self, reqs, rows: masks(
        self, [MaskedRequest(r.req_id, r.spec, r.row, []) for r in reqs], rows))
    broken = _grammar_counts(tiny_model_dir, AbcdDrafter(abcd, seed=2), 3000, seed=3)
    assert same_distribution_p(plain, broken) < 0.001
