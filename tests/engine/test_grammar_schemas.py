"""Ten JSON schemas on the real default model: every output validates (jsonschema), with DSpark
speculating (fixed γ, so drafts are verified every step) and without, and at T = 0 the two are
token-identical (fp32): refused drafts are rejected where the grammar refuses them."""

import json

import jsonschema
import pytest

from engine import LLM, SamplingParams, StructuredOutput

pytestmark = pytest.mark.slow

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 150}},
               "required": ["name", "age"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]}},
             "required": ["sentiment"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                          "minItems": 2, "maxItems": 4}},
              "required": ["colors"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"},
                                                 "count": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["x", "y", "count"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                                  "country": {"type": "string", "maxLength": 30}},
                 "required": ["name", "country"], "additionalProperties": False},
        "population": {"type": "integer", "minimum": 0}}, "required": ["city", "population"],
        "additionalProperties": False},
    "boolean": {"type": "object", "properties": {"answer": {"type": "boolean"},
                                                 "reason": {"type": "string", "maxLength": 60}},
                "required": ["answer", "reason"], "additionalProperties": False},
    "list_of_objects": {"type": "object", "properties": {"steps": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3},
                                         "text": {"type": "string", "maxLength": 30}},
        "required": ["n", "text"], "additionalProperties": False}}}, "required": ["steps"],
        "additionalProperties": False},
    "optional": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                                  "year": {"type": "integer", "minimum": 1000, "maximum": 2100}},
                 "required": ["title"], "additionalProperties": False},
    "string_enum_array": {"type": "object", "properties": {"days": {
        "type": "array", "items": {"enum": ["mon", "tue", "wed", "thu", "fri"]}, "minItems": 1, "maxItems": 5}},
        "required": ["days"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "string",
                                                                                          "maxLength": 20}]}},
               "required": ["value"], "additionalProperties": False},
}
QUESTIONS = {
    "person": "Describe Ada Lovelace.", "enum": "Classify: 'I love this phone.'",
    "array": "Name some colors.", "numbers": "Give a point and a count.",
    "nested": "Describe Paris.", "boolean": "Is the sky blue?", "list_of_objects": "How to boil an egg?",
    "optional": "Name a famous book.", "string_enum_array": "Which days are workdays?",
    "any_of": "Give me a value.",
}


@pytest.fixture(scope="module")
def dspark_llm():
    return LLM(dtype="float32", device="cpu", draft="dspark", num_draft_tokens=7, verify_policy="fixed")


def _run(llm: LLM, speculative: bool, temperature: float):
    prompts = [llm.encode_chat([{"role": "user", "content": f"{QUESTIONS[k]} Answer in JSON."}]) for k in SCHEMAS]
    params = [SamplingParams(max_tokens=160, temperature=temperature, seed=5, speculative=speculative,
                             structured=StructuredOutput("json_schema", json.dumps(s))) for s in SCHEMAS.values()]
    eng = llm.engine
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while eng.has_unfinished():
        done.update({o.req_id: o for o in eng.step() if o.finished})
    return [done[i] for i in ids]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_schemas_validate_with_and_without_speculation(dspark_llm, temperature):
    outs = {spec: _run(dspark_llm, spec, temperature) for spec in (True, False)}
    for spec, results in outs.items():
        for (name, schema), o in zip(SCHEMAS.items(), results):
            assert o.finish_reason == "stop", (spec, name, o.text)
            jsonschema.validate(json.loads(o.text), schema)
    assert sum(o.num_draft_tokens for o in outs[True]) > 0 and all(o.num_draft_tokens == 0 for o in outs[False])
    # greedy: exact; seeded sampling: the race coupling makes it exact too
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
