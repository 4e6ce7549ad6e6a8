"""Predicted Outputs: the prediction follows the output through edits, and verification keeps the
output exactly what it is without a prediction."""

import pytest

from draft import DraftInput
from draft.prediction import PREDICTION_DRAFT_TOKENS, PredictionDrafter
from scheduler import SamplingParams
from tests.draft.helpers import tiny_dspark, tiny_llm

PROMPT = [5, 9, 14]


def drafts_along(prediction: list[int], output: list[int], every: int = 1) -> list[list[int]]:
    """The prediction drafter's proposal after each `every` output tokens."""
    drafter = PredictionDrafter(None)
    out = []
    for n in range(0, len(output) + 1, every):
        x = DraftInput("r", PROMPT + output[:n], len(PROMPT) + n - 1, num_output_tokens=n, prediction=prediction)
        out.append(drafter.propose([x])[0].draft_token_ids)
    return out


def test_follows_the_prediction_and_realigns_after_an_edit():
    prediction = list(range(100, 160))
    # the output replaces 120..122 by two other tokens, then goes on with the prediction
    output = prediction[:20] + [7, 8] + prediction[23:40]
    drafts = drafts_along(prediction, output)
    assert drafts[0] == prediction[:PREDICTION_DRAFT_TOKENS]
    assert drafts[10] == prediction[10:10 + PREDICTION_DRAFT_TOKENS]
    assert drafts[21] == []  # lost inside the edit: no n-gram of the output is in the prediction
    # one output token after the edit, the alignment is back (on the 1-gram), with short
    # drafts while the confidence recovers
    assert 0 < len(drafts[23]) < PREDICTION_DRAFT_TOKENS and drafts[23] == prediction[24:24 + len(drafts[23])]
    assert drafts[-1][:5] == prediction[40:45]


def test_a_deletion_and_an_insertion():
    prediction = list(range(100, 160))
    deleted = prediction[:10] + prediction[30:50]  # 110..129 dropped
    assert drafts_along(prediction, deleted)[11][:3] == prediction[31:34]
    inserted = prediction[:10] + [1, 2, 3, 4] + prediction[10:30]
    drafts = drafts_along(prediction, inserted)
    assert drafts[15][:1] == prediction[11:12] and drafts[20][:2] == prediction[16:18]


def test_repeated_lines_realign_near_where_the_output_was():
    line = [50, 51, 52, 53]
    prediction = [1] + line + [2] + line + [3] + line + [4]
    # the output edits the token before the third copy of the line: the match nearest the
    # cursor (the third copy) wins over earlier copies
    output = prediction[:11] + [99] + line[:2]
    assert drafts_along(prediction, output)[-1][:3] == [52, 53, 4]


def test_an_unrelated_prediction_stops_being_proposed():
    prediction = list(range(100, 140))
    output = [7, 8] * 15
    drafts = drafts_along(prediction, output, every=1)
    assert drafts[0]  # nothing is known before the first output token
    assert all(not d for d in drafts[3:])
    # a prediction the output keeps to wins the confidence back
    assert drafts_along(prediction, [7, 8] * 4 + prediction[:20])[-1]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return tiny_llm(tiny_model_dir, block_size=4)


def _run(llm, prompt: list[int], params: SamplingParams):
    eng = llm.engine
    req = eng.add_request(prompt, params)
    steps = 0
    while True:
        steps += 1
        for out in eng.step():
            if out.req_id == req and out.finished:
                return out, steps


@pytest.mark.parametrize("drafter", ["none", "dspark"])
def test_output_is_the_same_with_any_prediction_and_a_good_one_saves_steps(tiny_model_dir, llm, drafter):
    options = {"verify_policy": "fixed"}
    if drafter == "dspark":
        options["drafter"] = tiny_dspark(llm, "dspark", "markov", block_size=4).make_drafter(3)
    eng = tiny_llm(tiny_model_dir, block_size=4, **options)
    prompt = [3, 17, 42, 8, 99, 23]
    for params in (SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
                   SamplingParams(max_tokens=40, temperature=1.0, seed=11, ignore_eos=True)):
        plain, plain_steps = _run(eng, prompt, params)
        edited = plain.token_ids[:15] + [1, 2] + plain.token_ids[18:]
        unrelated = [(t * 7 + 3) % 200 for t in range(60)]
        for prediction in (plain.token_ids, edited, unrelated):
            params.prediction = prediction
            out, steps = _run(eng, prompt, params)
            assert out.token_ids == plain.token_ids
            if prediction is not unrelated:
                assert out.num_prediction_accepted_tokens > 0 and steps < plain_steps
        exact, steps = _run(eng, prompt, SamplingParams(**{**_fields(params), "prediction": plain.token_ids}))
        assert exact.num_prediction_rejected_tokens <= 2  # nothing to reject but tails past the end
        assert steps <= 40 // PREDICTION_DRAFT_TOKENS + 3
        params.prediction = None


def _fields(params: SamplingParams) -> dict:
    return {f: getattr(params, f) for f in ("max_tokens", "temperature", "seed", "ignore_eos")}


def test_prediction_token_ids_are_validated(llm):
    from scheduler import InvalidRequest

    with pytest.raises(InvalidRequest, match="prediction"):
        llm.engine.add_request([1, 2], SamplingParams(prediction=[llm.engine.arch.vocab_size]))
    with pytest.raises(InvalidRequest, match="prediction"):
        SamplingParams(prediction=["a"])
