"""DSpark / DFlash drafter: heads agree between training and inference, the inference path
matches the training forward, checkpoints round-trip, and speculation stays lossless."""

import json

import pytest
import torch
from safetensors.torch import load_file

from draft.checkpoint import load_model, save_drafter
from draft.heads import MarkovHead, RNNHead
from engine import SamplingParams
from tests.draft.helpers import paged_input, standalone, tiny_dspark, tiny_llm
from tests.engine.test_engine import random_prompts, run_staggered


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    # it records features of whole sequences (_context_of): a prefix-cache hit would skip them
    return tiny_llm(tiny_model_dir, block_size=4, enable_prefix_caching=False)


@pytest.mark.parametrize("cls", [MarkovHead, RNNHead])
def test_head_teacher_forced_equals_step_by_step(cls):
    torch.manual_seed(0)
    vocab, rank, hidden, n, gamma = 50, 6, 12, 5, 7
    head = cls(vocab, rank, hidden) if cls is RNNHead else cls(vocab, rank)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    h = torch.randn(n, gamma, hidden)
    base = torch.randn(n, gamma, vocab)
    # sample step by step, then feed the sampled tokens back teacher-forced
    gen = torch.Generator().manual_seed(1)
    prev = torch.randint(vocab, (n,))
    state = head.init_state(n, h)
    prevs, step_logits = [prev], []
    for k in range(gamma):
        bias, state = head.step(state, prev, h[:, k])
        logits = base[:, k] + bias
        step_logits.append(logits)
        prev = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
        prevs.append(prev)
    forced = base + head.teacher_forced(torch.stack(prevs[:-1], 1), h)
    torch.testing.assert_close(forced, torch.stack(step_logits, 1), rtol=1e-5, atol=1e-5)
    assert step_logits[1].sub(step_logits[0]).abs().max() > 0  # the head really acts


def _context_of(llm, tokens: list[int], layers) -> torch.Tensor:
    from draft.training.cache import FeatureRecorder

    rec = FeatureRecorder(layers)
    llm.engine.runner.drafter = rec
    try:
        llm.generate([tokens], SamplingParams(max_tokens=1))
    finally:
        llm.engine.runner.drafter = None
    return rec.pop("req-" + str(next(llm.engine._ids) - 1))  # [len(tokens), F]


@pytest.mark.parametrize("kind,head", [("dspark", "markov"), ("dspark", "rnn"), ("dflash", "markov"),
                                       ("mtp", "none")])
def test_inference_path_matches_training_forward(llm, kind, head):
    """The drafter's cached-context, batched block pass gives the training forward's logits
    (teacher-forced on the drafter's own greedy tokens) and confidences."""
    model = tiny_dspark(llm, kind, head, block_size=4)
    g = min(4, model.max_draft_tokens)
    seqs = [[(7 * i + s0) % 250 + 3 for i in range(23)] for s0 in (3, 40)]
    feats = [_context_of(llm, s, model.config.target_layers) for s in seqs]
    drafter = standalone(model.make_drafter(4))
    assert drafter.num_draft_tokens == g
    # deliver context in two uneven chunks (the second one after a "rejected" stale tail)
    inputs = []
    for i, (s, f) in enumerate(zip(seqs, feats)):
        drafter.propose([paged_input(f"r{i}", s[:10], 10, f[:10], wants_proposal=False)])
        drafter.propose([paged_input(f"r{i}", s[:14], 14, f[10:14], wants_proposal=False)])  # stale
        inputs.append(paged_input(f"r{i}", s, len(s) - 1, f[10:len(s) - 1], temperature=0.0))
    proposals = drafter.propose(inputs)
    for s, f, p in zip(seqs, feats, proposals):
        a = len(s) - 1
        h = model.forward_blocks(torch.tensor([s]), f[None], torch.tensor([[a]]), g)[0]  # [1, g, H]
        prev = torch.tensor([[s[a]] + p.draft_token_ids[:-1]])
        logits, conf = model.teacher_forced(h, prev)
        assert p.draft_token_ids == logits[0].argmax(-1).tolist()
        torch.testing.assert_close(torch.tensor(p.confidences), conf[0].sigmoid(), rtol=1e-4, atol=1e-5)
    # sampled requests get the exact distributions they were drawn from
    p = drafter.propose([paged_input("r0", seqs[0], len(seqs[0]) - 1, None, temperature=0.7)])[0]
    h = model.forward_blocks(torch.tensor([seqs[0]]), feats[0][None], torch.tensor([[len(seqs[0]) - 1]]), g)[0]
    logits, _ = model.teacher_forced(h, torch.tensor([[seqs[0][-1]] + p.draft_token_ids[:-1]]))
    torch.testing.assert_close(p.draft_probs, (logits[0] / 0.7).softmax(-1), rtol=1e-4, atol=1e-6)
    assert p.draft_probs[torch.arange(g), p.draft_token_ids].min() > 0


def test_confidence_sts_and_checkpoint_round_trip(llm, tmp_path):
    model = tiny_dspark(llm, "dspark", "rnn", confidence_temperatures=(1.0, 2.0, 0.5, 1.5))
    save_drafter(model, tmp_path / "ck")
    saved = load_file(str(tmp_path / "ck" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in saved.values())
    assert not any("embed_tokens" in k or "lm_head" in k for k in saved)  # shared, never saved
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["head"] == "rnn" and cfg["confidence_temperatures"] == [1.0, 2.0, 0.5, 1.5]
    loaded = load_model(tmp_path / "ck", llm.engine._target_handle())
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, saved[k].float())
    seq = [(5 * i + 9) % 250 + 3 for i in range(12)]
    f = _context_of(llm, seq, model.config.target_layers)
    outs = []
    for m in (model, loaded):
        d = standalone(m.make_drafter(4))
        outs.append(d.propose([paged_input("r", seq, len(seq) - 1, f[:-1], temperature=0.0)])[0])
    assert all(0.0 < c < 1.0 for c in outs[1].confidences)
    # bf16 rounding of the saved weights moves confidences only slightly
    assert max(abs(a - b) for a, b in zip(outs[0].confidences, outs[1].confidences)) < 0.05
    # STS: c_k = sigmoid(logit / T_k)
    h = model.forward_blocks(torch.tensor([seq]), f[None], torch.tensor([[len(seq) - 1]]), 4)[0]
    _, raw = model.teacher_forced(h, torch.tensor([[seq[-1]] + outs[0].draft_token_ids[:-1]]))
    expected = (raw[0] / torch.tensor([1.0, 2.0, 0.5, 1.5])).sigmoid()
    torch.testing.assert_close(torch.tensor(outs[0].confidences), expected, rtol=1e-4, atol=1e-5)


def vocab_dspark(llm, head: str, size: int, kind: str = "dspark", **options):
    """A tiny drafter with a random draft vocabulary of `size` tokens."""
    model = tiny_dspark(llm, kind, head, draft_vocab_size=size, **options)
    ids = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(3))[:size]
    model.draft_vocab.copy_(ids.sort().values)
    return model


@pytest.mark.parametrize("kind,head", [("dspark", "rnn"), ("dflash", "markov"), ("mtp", "none"),
                                       ("eagle3", "none"), ("dspark-vocab", "markov"), ("eagle3-vocab", "none")])
def test_greedy_lossless_batched(tiny_model_dir, llm, kind, head):
    prompts = random_prompts(8, seed=11)
    params = [SamplingParams(max_tokens=6 + 3 * (i % 4), temperature=0, ignore_eos=True) for i in range(8)]
    expected = {i: o.token_ids for i, o in enumerate(llm.generate(prompts, params))}
    # The drafter is random: losslessness must hold whatever it proposes (all of it verified;
    # the scheduled policy would rightly stop verifying a random drafter).
    if kind.endswith("-vocab"):
        model = vocab_dspark(llm, head, 96, kind.removesuffix("-vocab"), seed=5)
    else:
        model = tiny_dspark(llm, kind, head, seed=5)
    spec = tiny_llm(tiny_model_dir, block_size=4, drafter=model.make_drafter(3), verify_policy="fixed")
    lengths = []
    execute = spec.engine.runner.execute

    def recording(sched_out):
        lengths.append([s.num_draft_tokens for s in sched_out.scheduled if s.sample])
        return execute(sched_out)

    spec.engine.runner.execute = recording
    assert run_staggered(spec, prompts, params, per_step=3) == expected
    assert any(len(set(step)) > 1 for step in lengths), "no step mixed verify lengths"
    if kind == "mtp" or kind.endswith("-vocab"):
        return  # with γ = 1 this pool does not run out: preemption is covered by the others
    # preemption (recompute) resets the drafter's context correctly
    small = tiny_llm(tiny_model_dir, block_size=4, num_blocks=30, max_num_batched_tokens=32, verify_policy="fixed",
                     drafter=tiny_dspark(llm, kind, head).make_drafter(3))
    assert run_staggered(small, prompts, params, per_step=8) == expected
    assert small.engine.scheduler.num_preemptions > 0


def test_eagle3_inference_matches_ttt_training_forward(llm):
    """EAGLE-3's γ autoregressive steps equal the training-time-test forward teacher-forced on
    the drafted tokens (chain of the last anchor), logits and confidences."""
    model = tiny_dspark(llm, "eagle3", "none", block_size=4)
    seq = [(7 * i + 3) % 250 + 3 for i in range(21)]
    feats = _context_of(llm, seq, model.config.target_layers)
    drafter = standalone(model.make_drafter(4))
    drafter.propose([paged_input("r", seq[:9], 9, feats[:9], wants_proposal=False)])
    greedy = drafter.propose([paged_input("r", seq, 20, feats[9:20], temperature=0.0)])[0]
    sampled = drafter.propose([paged_input("r", seq, 20, None, temperature=0.8)])[0]
    for p in (greedy, sampled):
        ext = seq + p.draft_token_ids[:-1]
        f = torch.cat([feats[:20], torch.zeros(len(ext) - 20, feats.shape[1])])[None]
        logits, conf, _, _ = model.train_forward(torch.tensor([ext]), f, torch.tensor([len(ext) + 1]),
                                                 torch.tensor([[20]]), torch.tensor([[True]]))
        if p is greedy:
            assert p.draft_token_ids == logits[0, 0].argmax(-1).tolist()
        else:
            torch.testing.assert_close(p.draft_probs, (logits[0, 0] / 0.8).softmax(-1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(p.confidences), conf[0, 0].sigmoid(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("kind", "head"), [("dspark", "markov"), ("dspark", "rnn"), ("eagle3", "none")])
def test_fewer_draft_positions_are_a_prefix_of_the_full_draft(llm, kind, head):
    """`max_draft_tokens` (the verify plan's room) cuts the proposal without changing it: the
    DSpark backbone still sees its whole block, so greedy drafts and confidences are a prefix."""
    model = tiny_dspark(llm, kind, head, block_size=4)
    seq = [(11 * i + 5) % 250 + 3 for i in range(15)]
    feats = _context_of(llm, seq, model.config.target_layers)
    full, short = (standalone(model.make_drafter(4)).propose([paged_input("r", seq, len(seq) - 1, feats[:-1], temperature=0.0,
                                                             max_draft_tokens=limit)])[0]
                   for limit in (None, 2))
    assert len(full) == 4 and short.draft_token_ids == full.draft_token_ids[:2]
    assert short.confidences == pytest.approx(full.confidences[:2], rel=1e-5)


@pytest.mark.parametrize(("kind", "confidence", "policy"), [("dspark", True, "scheduled"),
                                                            ("dflash", False, "fixed"),
                                                            ("eagle3", True, "scheduled")])
def test_auto_verify_policy_schedules_drafters_with_confidences(llm, tiny_model_dir, kind, confidence, policy):
    model = tiny_dspark(llm, kind, "markov" if kind == "dspark" else "none", confidence=confidence)
    served = tiny_llm(tiny_model_dir, block_size=4, drafter=model.make_drafter(3))
    assert served.engine.scheduler.verify_policy.name == policy


@pytest.mark.parametrize(("kind", "head"), [("dspark", "markov"), ("eagle3", "none"), ("mtp", "none")])
def test_resting_drafter_holds_context_until_a_block_fills(llm, kind, head):
    """A request that does not draft holds its features until they fill a KV block (then
    that block's context is paged); its next draft equals that of a drafter given the whole
    context at once, also after a restart from position 0 (preemption)."""
    model = tiny_dspark(llm, kind, head, block_size=4)
    seq = [(13 * i + 2) % 250 + 3 for i in range(23)]
    feats = _context_of(llm, seq, model.config.target_layers)
    a = len(seq) - 1

    def final(drafter):
        return drafter.propose([paged_input("r", seq, a, None, temperature=0.0)])[0]

    eager = standalone(model.make_drafter(4))
    eager.propose([paged_input("r", seq[:a], a, feats[:a], wants_proposal=False)])
    assert eager.held["r"].end - eager.held["r"].start == a % 4  # its full blocks are paged
    expected = final(eager)

    lazy = standalone(model.make_drafter(4))
    lazy.propose([paged_input("r", seq[:5], 5, feats[:5], wants_proposal=False)])
    lazy.propose([paged_input("r", seq[:3], 3, feats[:3], wants_proposal=False)])  # restart (preempted)
    for n in range(4, a + 1):  # one committed token per resting step
        lazy.propose([paged_input("r", seq[:n], n, feats[n - 1:n], wants_proposal=False)])
        held = lazy.held.get("r")
        assert (held.end - held.start if held else 0) == n % 4  # only the partial block waits
    got = final(lazy)
    assert got.draft_token_ids == expected.draft_token_ids
    assert got.confidences == pytest.approx(expected.confidences, rel=1e-4)


@pytest.mark.parametrize("head", ["markov", "rnn"])
def test_draft_vocabulary_restricts_proposals_exactly(llm, head, tmp_path):
    """With a draft vocabulary every drafted token is in it, and `draft_probs` are the
    restricted distributions the tokens were drawn from (zero elsewhere); greedy drafts are
    the restricted argmax. The ids survive a checkpoint round trip as integers."""
    model = vocab_dspark(llm, head, 40)
    ids = model.draft_vocab
    seq = [(7 * i + 9) % 250 + 3 for i in range(19)]
    feats = _context_of(llm, seq, model.config.target_layers)
    a = len(seq) - 1
    h = model.forward_blocks(torch.tensor([seq]), feats[None], torch.tensor([[a]]), 4)[0]
    for temp in (0.0, 0.8):
        p = standalone(model.make_drafter(4)).propose([paged_input("r", seq, a, feats[:a], temperature=temp)])[0]
        assert set(p.draft_token_ids) <= set(ids.tolist())
        logits, _ = model.teacher_forced(h, torch.tensor([[seq[a]] + p.draft_token_ids[:-1]]))
        restricted = logits[0]  # the training forward computes the draft vocabulary's columns
        assert restricted.shape[-1] == ids.numel()
        if temp == 0:
            assert p.draft_token_ids == ids[restricted.argmax(-1)].tolist()
            continue
        outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
        outside[ids] = False
        assert p.draft_probs[:, outside].abs().max() == 0
        torch.testing.assert_close(p.draft_probs[:, ids], (restricted / temp).softmax(-1), rtol=1e-4, atol=1e-6)
    save_drafter(model, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck", model.target, dtype=torch.float32)
    assert loaded.draft_vocab.dtype == torch.long and torch.equal(loaded.draft_vocab, ids)


def test_draft_vocabulary_from_training_responses(tmp_path, llm):
    from draft.training.cache import CacheWriter
    from draft.training.vocab import set_draft_vocab, top_tokens

    rows = [{"key": "a", "split": "train", "dataset": "d", "prompt_ids": [9, 9], "response_ids": [5, 5, 5, 7, 7, 9]},
            {"key": "b", "split": "heldout", "dataset": "d", "prompt_ids": [11], "response_ids": [11, 11, 5, 9]},
            {"key": "c", "split": "train", "dataset": "d", "prompt_ids": [], "response_ids": [7, 3]}]
    arch = llm.engine.arch
    layers = (0, arch.num_layers - 1)
    writer = CacheWriter(tmp_path / "cache", layers, arch.hidden_size)
    n = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows]
    writer.write(rows, [torch.zeros(t, len(layers) * arch.hidden_size) for t in n], llm.engine.model.norm)
    from draft.training.cache import load_sequences

    train, held = load_sequences(tmp_path / "cache", "train"), load_sequences(tmp_path / "cache", "heldout")
    ids, coverage = top_tokens(train, held, 2, 16)  # counts 5: 3, 7: 3, 9: 3 (prompt included)
    assert ids.tolist() == [5, 7] and coverage == pytest.approx(1 / 4)  # ties by lower id
    ids, coverage = top_tokens(train, held, 5, 16)  # then 3, then the unseen lowest id (0)
    assert ids.tolist() == [0, 3, 5, 7, 9] and coverage == pytest.approx(2 / 4)
    model = tiny_dspark(llm, "dspark", "markov", block_size=4)
    save_drafter(model, tmp_path / "ck")
    report = set_draft_vocab(tmp_path / "ck", tmp_path, 2)
    assert report["coverage"] == pytest.approx(1 / 4)
    loaded = load_model(tmp_path / "ck", model.target, dtype=torch.float32)
    assert loaded.draft_vocab.tolist() == [5, 7]
    feats = _context_of(llm, [3, 4], loaded.config.target_layers)
    proposal = standalone(loaded.make_drafter(4)).propose([paged_input("r", [3, 4], 1, feats[:1], temperature=0.0)])[0]
    assert len(proposal) == 4 and set(proposal.draft_token_ids) <= {5, 7}


def test_drafting_pass_time_excludes_resting_steps(llm):
    """`last_pass_seconds` times the drafting pass only: unset on a step that drafts nothing."""
    model = tiny_dspark(llm, "dspark", "markov", block_size=4)
    seq = [(5 * i + 1) % 250 + 3 for i in range(12)]
    feats = _context_of(llm, seq, model.config.target_layers)
    drafter = standalone(model.make_drafter(4))
    drafter.propose([paged_input("r", seq[:8], 8, feats[:8], wants_proposal=False)])
    assert drafter.last_pass_seconds is None
    drafter.propose([paged_input("r", seq, 11, feats[8:11], temperature=0.0)])
    assert drafter.last_pass_seconds is not None and drafter.last_pass_seconds > 0


def test_eagle3_draft_vocabulary_renormalises_its_distribution(llm):
    """EAGLE-3 with a draft vocabulary draws its first token from the full drafter's
    distribution restricted to the vocabulary and renormalised (same weights), zero elsewhere."""
    full = tiny_dspark(llm, "eagle3", "none", block_size=4)
    restricted = vocab_dspark(llm, "none", 40, "eagle3", block_size=4)
    ids = restricted.draft_vocab
    seq = [(9 * i + 4) % 250 + 3 for i in range(17)]
    feats = _context_of(llm, seq, full.config.target_layers)
    a = len(seq) - 1
    x = paged_input("r", seq, a, feats[:a], temperature=0.8)
    p_full = standalone(full.make_drafter(4)).propose([x])[0]
    p_voc = standalone(restricted.make_drafter(4)).propose([x])[0]
    assert set(p_voc.draft_token_ids) <= set(ids.tolist())
    row = p_full.draft_probs[0, ids]
    torch.testing.assert_close(p_voc.draft_probs[0, ids], row / row.sum(), rtol=1e-4, atol=1e-6)
    assert p_voc.draft_probs.sum() == pytest.approx(4.0, rel=1e-4)  # rows sum to one over the vocabulary
    greedy = standalone(restricted.make_drafter(4)).propose([paged_input("r", seq, a, feats[:a], temperature=0.0)])[0]
    assert greedy.draft_token_ids[0] == int(ids[row.argmax()])


@pytest.mark.parametrize("with_vocab", [False, True])
def test_seeded_draws_share_the_targets_race(with_vocab):
    """A seeded request's drafts are the race winners of its output positions: a drafter whose
    distribution equals the target's has every draft accepted; greedy rows take the argmax."""
    from draft.dspark import DraftSampling
    from engine.sampler import Sampler

    vocab, gamma = 40, 5
    gen = torch.Generator().manual_seed(0)
    vocab_ids = torch.randperm(vocab, generator=gen)[:25] if with_vocab else None
    cols = vocab_ids.numel() if with_vocab else vocab
    inputs = [paged_input("a", [1, 2], 1, temperature=0.8, seed=11, num_output_tokens=3),
              paged_input("b", [1, 2], 1, temperature=0.8),
              paged_input("c", [1, 2], 1, temperature=0.0, seed=5, num_output_tokens=0)]
    sampling = DraftSampling(inputs, vocab_ids, vocab, gen, torch.device("cpu"))
    logits = 3.0 * torch.randn(gamma, len(inputs), cols, generator=gen)
    for k in range(gamma):
        sampling.draw(logits[k])
    proposals = sampling.proposals([torch.ones(len(inputs))] * gamma)
    seeded = proposals[0]
    emitted = Sampler._verify_seeded(seeded.draft_probs, 11, 3, seeded.draft_token_ids[:-1])
    assert emitted == seeded.draft_token_ids  # all accepted, then the same winner as the bonus
    other = Sampler._verify_seeded(seeded.draft_probs, 12, 3, seeded.draft_token_ids[:-1])
    assert other != seeded.draft_token_ids  # the race really is keyed on the seed
    greedy = logits[:, 2].argmax(-1)
    assert proposals[2].draft_token_ids == (greedy if vocab_ids is None else vocab_ids[greedy]).tolist()
