"""Structured outputs on the tiny byte-level model: outputs follow the grammar, and speculation
stays exact: a drafter proposing the unconstrained continuation gets its refused drafts
rejected where the grammar refuses them (greedy and seeded outputs equal plain decoding's)."""

import json

import pytest

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
