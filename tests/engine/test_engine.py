"""Engine behaviour on a tiny random model: batching is invisible, seeds reproduce, bad input
is refused with typed errors while the engine keeps serving."""

import random

import pytest

from engine import LLM, InvalidRequest, ModelLoadError, SamplingParams
from scheduler import CapacityExceeded


def tiny_llm(path, **options) -> LLM:
    return LLM(model=str(path), device="cpu", dtype="float32", **options)


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.choice([1, 3, 9, 17, 40, 75]))] for _ in range(n)]


def run_staggered(llm: LLM, prompts: list[list[int]], params: list[SamplingParams],
                  per_step: int = 2) -> dict[int, list[int]]:
    """Submit `per_step` new requests before each step; return output ids by prompt index."""
    eng = llm.engine
    pending = list(range(len(prompts)))
    ids: dict[str, int] = {}
    done: dict[int, list[int]] = {}
    while pending or eng.has_unfinished():
        for _ in range(min(per_step, len(pending))):
            i = pending.pop(0)
            ids[eng.add_request(prompts[i], params[i])] = i
        for out in eng.step():
            if out.finished:
                done[ids[out.req_id]] = out.token_ids
    return done


def alone(llm: LLM, prompts, params) -> dict[int, list[int]]:
    return {i: llm.generate([p], sp)[0].token_ids for i, (p, sp) in enumerate(zip(prompts, params))}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return tiny_llm(tiny_model_dir, block_size=4)


def test_batching_is_invisible_greedy(tiny_model_dir, llm):
    prompts = random_prompts(16)
    params = [SamplingParams(max_tokens=8 + 3 * (i % 5), temperature=0, ignore_eos=True) for i in range(16)]
    expected = alone(llm, prompts, params)
    assert run_staggered(llm, prompts, params) == expected
    # A KV pool far too small for 16 requests forces preemption and recompute; still the same.
    small = tiny_llm(tiny_model_dir, block_size=4, num_blocks=40, max_num_batched_tokens=32)
    assert run_staggered(small, prompts, params, per_step=4) == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.block_manager.usage == 0.0


def test_chunked_prefill_matches_whole_prefill(tiny_model_dir, llm):
    prompt = random_prompts(1, seed=3)[0] * 4  # long enough to span many chunks
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    chunked = tiny_llm(tiny_model_dir, block_size=4, max_num_batched_tokens=7)
    assert chunked.generate([prompt], params)[0].token_ids == llm.generate([prompt], params)[0].token_ids


def test_seeded_sampling_is_reproducible_regardless_of_batch(tiny_model_dir, llm):
    prompts = random_prompts(8, seed=1)
    params = [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=100 + i,
                             ignore_eos=True) for i in range(8)]
    expected = alone(llm, prompts, params)
    assert run_staggered(llm, prompts, params, per_step=3) == expected
    # mixed with unseeded requests and under preemption
    noise = random_prompts(6, seed=2)
    noise_params = [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)] * 6
    small = tiny_llm(tiny_model_dir, block_size=4, num_blocks=30)
    got = run_staggered(small, noise + prompts, noise_params + params, per_step=5)
    assert {i: got[i + 6] for i in range(8)} == expected
    assert small.engine.scheduler.num_preemptions > 0
    # different seeds give different samples (the seed is really used)
    assert len({tuple(v) for v in expected.values()}) > 1


def test_stop_strings_and_stop_token_ids(llm):
    prompt = random_prompts(1, seed=5)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    text = free.text
    assert len(text) > 6
    stop = text[3:5]
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.index(stop)]
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                stop_token_ids=[free.token_ids[4]]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[:free.token_ids.index(free.token_ids[4]) + 1]
    assert free.finish_reason == "length" and len(free.token_ids) == 20


@pytest.mark.parametrize("make_params, param", [
    (lambda: SamplingParams(max_tokens=0), "max_tokens"),
    (lambda: SamplingParams(max_tokens=-3), "max_tokens"),
    (lambda: SamplingParams(top_p=0.0), "top_p"),
    (lambda: SamplingParams(top_p=1.5), "top_p"),
    (lambda: SamplingParams(temperature=-0.1), "temperature"),
])
def test_bad_sampling_params_raise(make_params, param):
    with pytest.raises(InvalidRequest) as e:
        make_params()
    assert e.value.param == param


def test_bad_prompts_raise_and_engine_keeps_serving(llm):
    eng = llm.engine
    ok = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    running = eng.add_request([5, 6, 7], ok)
    eng.step()
    with pytest.raises(InvalidRequest, match="empty"):
        eng.add_request([], ok)
    with pytest.raises(InvalidRequest, match="empty"):
        eng.add_request("", ok)
    with pytest.raises(InvalidRequest, match="maximum context length is 512"):
        eng.add_request([7] * 600, ok)
    with pytest.raises(InvalidRequest, match="token ids"):
        eng.add_request([5, 10**6], ok)
    outs = []
    while eng.has_unfinished():
        outs += [o for o in eng.step() if o.finished]
    assert [o.req_id for o in outs] == [running] and len(outs[0].token_ids) == 5
    assert eng.block_manager.usage == 0.0
    assert llm.generate([[1, 2, 3]], ok)[0].finish_reason == "length"


def test_waiting_queue_limit(tiny_model_dir):
    small = tiny_llm(tiny_model_dir, max_waiting=2)
    p = SamplingParams(max_tokens=2)
    small.engine.add_request([5], p)
    small.engine.add_request([6], p)
    with pytest.raises(CapacityExceeded):
        small.engine.add_request([7], p)


def test_abort_frees_blocks(llm):
    eng = llm.engine
    rid = eng.add_request([5] * 30, SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    assert eng.block_manager.usage > 0
    eng.abort_request(rid)
    assert not eng.has_unfinished() and eng.block_manager.usage == 0.0


def test_unknown_model_path_and_corrupt_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(model=str(tmp_path / "nope"), device="cpu")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError):
        LLM(model=str(bad), device="cpu")
    truncated = tmp_path / "trunc.gguf"
    from engine.loader import default_model_path
    truncated.write_bytes(default_model_path().read_bytes()[:1_000_000])
    with pytest.raises(ModelLoadError):
        LLM(model=str(truncated), device="cpu")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(model=str(tmp_path / "empty_dir"), device="cpu")


@pytest.mark.parametrize("policy", ["fixed", "none", "threshold", "causal", "scheduled"])
def test_every_verify_policy_is_greedy_lossless(tiny_model_dir, llm, policy):
    # repetitive prompts so that prompt lookup proposes drafts
    prompts = [p * 3 for p in random_prompts(8, seed=7)]
    params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)] * 8
    spec = tiny_llm(tiny_model_dir, block_size=4, draft="ngram", num_draft_tokens=3,
                    verify_policy=policy, max_num_batched_tokens=64)
    assert run_staggered(spec, prompts, params, per_step=3) == run_staggered(llm, prompts, params)
    if policy in ("causal", "scheduled"):
        assert spec.engine.sps is not None and spec.engine.sps(1) > 0
    assert spec.engine.scheduler.verify_policy.name == policy


@pytest.mark.parametrize("draft", [None, "ngram"])
def test_overlapped_engine_matches_sequential(tiny_model_dir, llm, draft, monkeypatch):
    # Seeded sampling consumes randomness per verified draft, so both engines must plan the
    # same verify lengths: the scheduled policy weighs measured drafting times, which differ
    # between two runs on a loaded machine; here it plans from the (shared) SPS table alone.
    from scheduler.verify_policy import ScheduledVerify

    monkeypatch.setattr(ScheduledVerify, "observe_draft_seconds", lambda self, seconds: None)
    prompts = [p * 2 for p in random_prompts(10, seed=11)]
    greedy = [SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)] * 5
    seeded = [SamplingParams(max_tokens=14, temperature=1.0, seed=i, ignore_eos=True) for i in range(5)]
    params = greedy + seeded
    options = {"block_size": 4, "draft": draft, "num_draft_tokens": 3,
               "verify_policy": "scheduled" if draft else "auto"}
    sequential = tiny_llm(tiny_model_dir, **options)
    overlapped = tiny_llm(tiny_model_dir, overlap=True, **options)
    expected = run_staggered(sequential, prompts, params, per_step=3)
    assert run_staggered(overlapped, prompts, params, per_step=3) == expected
    # stop strings are found one step late with overlap; output must still end at the stop
    text = sequential.generate([prompts[0]], greedy[0])[0].text
    stop = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, stop=[text[4:6]])
    a = sequential.generate([prompts[0]], stop)[0]
    b = overlapped.generate([prompts[0]], stop)[0]
    assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
    assert overlapped.engine.block_manager.usage == 0.0 and not overlapped.engine.has_unfinished()
    overlapped.engine.close()


def test_a_probe_room_reaches_only_the_chosen_requests_drafts(tiny_model_dir):
    """The runner turns each request's room into its drafter input: while the policy probes
    (one position, two requests), two of six requests are asked for one draft token per step,
    taking turns, the rest only extend context; greedy output equals plain decoding's."""
    from draft import Drafter, DraftInput, Proposal
    from scheduler.verify_policy import DraftRoom, FixedVerify

    class Recording(Drafter):
        name = "recording"
        num_draft_tokens = 3

        def __init__(self) -> None:
            self.asked: list[list[tuple[str, int | None]]] = []

        def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
            self.asked.append([(x.req_id, x.max_draft_tokens) for x in inputs if x.wants_proposal])
            return [Proposal([7] * (x.max_draft_tokens or 3) if x.wants_proposal else []) for x in inputs]

    class Probing(FixedVerify):
        def draft_room(self) -> DraftRoom:
            return DraftRoom(1, 2)

    prompts = [[1 + i, 2, 3 + i] for i in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(str(tiny_model_dir), "cpu", "float32").generate(prompts, params)]
    drafter = Recording()
    llm = LLM(str(tiny_model_dir), "cpu", "float32", drafter=drafter)
    llm.engine.scheduler.verify_policy = Probing()
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    asked = [step for step in drafter.asked if step]
    assert asked and all(len(step) <= 2 and all(n == 1 for _, n in step) for step in asked)
    assert len({req for step in asked for req, _ in step}) == 6


def test_requests_admitted_while_the_drafter_rests_reach_it_without_context(tiny_model_dir):
    """While the policy rests the drafter with a pool of 2, the first two requests send it
    their context features and take the probes; the other four send none (no context pass to
    pay) and are never asked to draft. Greedy output equals plain decoding's."""
    from draft import Drafter, DraftInput, Proposal
    from scheduler.verify_policy import DraftRoom, FixedVerify

    class Recording(Drafter):
        name = "recording"
        num_draft_tokens = 3
        target_layers = (0,)

        def __init__(self) -> None:
            self.fed: set[str] = set()
            self.asked: set[str] = set()

        def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
            self.fed |= {x.req_id for x in inputs if x.context_features is not None}
            self.asked |= {x.req_id for x in inputs if x.wants_proposal}
            return [Proposal([7] * (x.max_draft_tokens or 3) if x.wants_proposal else []) for x in inputs]

    class Resting(FixedVerify):
        def draft_room(self) -> DraftRoom:
            return DraftRoom(1, 2)

        @property
        def context_pool(self) -> int | None:
            return 2

    prompts = [[1 + i, 2, 3 + i] for i in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in LLM(str(tiny_model_dir), "cpu", "float32").generate(prompts, params)]
    drafter = Recording()
    engine = LLM(str(tiny_model_dir), "cpu", "float32", drafter=drafter).engine
    engine.scheduler.verify_policy = Resting()
    ids = [engine.add_request(p, params) for p in prompts]
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        outputs |= {o.req_id: o.token_ids for o in engine.step() if o.finished}
    assert [outputs[i] for i in ids] == expected
    assert drafter.fed == drafter.asked == set(ids[:2])
