"""Bias and penalties per verify row: row k sees the output plus the first k drafts, the
definitions match OpenAI's and Hugging Face's, and logprobs come from the processed rows."""

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from engine.logits_processor import RowContext, process_logits
from engine.sampler import Sampler
from scheduler import InvalidRequest, SamplingParams

VOCAB = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


PENALISED = SamplingParams(frequency_penalty=0.7, presence_penalty=0.4, repetition_penalty=1.5,
                           logit_bias={4: 5.0, 9: -3.0})


def test_each_verify_row_equals_plain_processing_after_the_drafts_before_it():
    prompt, output, drafts = [1, 2, 3, 2], [7, 7, 8], [8, 9, 7]
    logits = _logits(len(drafts) + 1)
    together = process_logits(logits, [RowContext(PENALISED, prompt, output, drafts)])
    for k in range(len(drafts) + 1):
        alone = process_logits(logits[k:k + 1], [RowContext(PENALISED, prompt, output + drafts[:k], [])])
        torch.testing.assert_close(together[k], alone[0], rtol=0, atol=0)


def test_definitions_match_openai_and_hugging_face():
    prompt, output = [1, 2, 3], [3, 5, 5, 5, 6]
    logits = _logits(1, seed=1)
    rep = SamplingParams(repetition_penalty=1.7)
    got = process_logits(logits, [RowContext(rep, prompt, output, [])])
    hf = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(got, hf)
    additive = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={0: 1.5})
    got = process_logits(logits, [RowContext(additive, prompt, output, [])])
    expected = logits.clone()
    expected[0, 0] += 1.5
    for token, count in {3: 1, 5: 3, 6: 1}.items():  # OpenAI: output tokens only, not the prompt
        expected[0, token] -= 0.5 * count + 0.25
    torch.testing.assert_close(got, expected)


def test_untouched_requests_share_the_batch_unchanged():
    logits = _logits(3)
    plain = SamplingParams()
    assert process_logits(logits, [RowContext(plain, [], [], []), RowContext(plain, [], [], [1])]) is logits
    out = process_logits(logits, [RowContext(plain, [], [], []), RowContext(PENALISED, [1], [2], [3])])
    torch.testing.assert_close(out[0], logits[0], rtol=0, atol=0)
    assert not torch.equal(out[1:], logits[1:])


def test_logit_bias_forces_a_token_greedily_and_logprobs_follow_the_processed_rows():
    logits = _logits(3)
    sampler = Sampler(torch.device("cpu"), seed=0)
    forced = SamplingParams(temperature=0.0, logit_bias={11: 100.0}, logprobs=2)
    verified = sampler.verify(logits, [forced], [0], [[11, 4]], [None], [RowContext(forced, [5], [], [11, 4])])
    assert verified.token_ids == [[11, 11]]  # draft 11 accepted, draft 4 rejected, 11 again
    processed = logits.clone()
    processed[:, 11] += 100.0
    logp = processed.log_softmax(-1)
    lps = verified.logprobs[0]
    assert [lp.token_id for lp in lps] == [11, 11]
    for k, lp in enumerate(lps):
        assert lp.logprob == pytest.approx(logp[k, 11].item(), abs=1e-6)
        assert [t for t, _ in lp.top] == logp[k].topk(2).indices.tolist()


def test_logprobs_at_temperature_and_min_p_filtering():
    logits = _logits(1, seed=3)
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = SamplingParams(temperature=0.5, min_p=0.3, logprobs=0)
    verified = sampler.verify(logits, [params], [0], [[]], [None], [RowContext(params, [], [], [])])
    token = verified.token_ids[0][0]
    probs = (logits[0] / 0.5).softmax(-1)
    assert probs[token] >= 0.3 * probs.max()  # min_p kept it
    assert verified.logprobs[0][0].logprob == pytest.approx(probs[token].log().item(), abs=1e-5)
    assert verified.logprobs[0][0].top == ()


def test_penalties_without_contexts_are_refused_not_skipped():
    with pytest.raises(ValueError):
        Sampler(torch.device("cpu"), 0).verify(_logits(1), [PENALISED], [0], [[]], [None])


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3),
                                         ("repetition_penalty", 0.0), ("min_p", 1.5),
                                         ("logit_bias", {1: 101}), ("logit_bias", {-1: 1.0}),
                                         ("logprobs", 21), ("logprobs", -1)])
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(InvalidRequest):
        SamplingParams(**{field: value})
