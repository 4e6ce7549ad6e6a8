"""Scheduler driven by hand-built ModelRunnerOutputs: no model, no torch."""

import random
from collections.abc import Callable

import pytest

from scheduler.block_manager import BlockManager, cdiv
from scheduler.errors import CapacityExceeded
from scheduler.outputs import ModelRunnerOutput, RequestUpdate, ScheduledRequest, SchedulerOutput
from scheduler.request import Request, RequestStatus
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.verify_policy import DraftRoom, FixedVerify

# ---- helpers --------------------------------------------------------------------------

TokenFn = Callable[[ScheduledRequest, int], "int | list[int]"]


def make_sched(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 64,
               max_num_batched_tokens: int = 512, max_waiting: int = 0,
               prefix_caching: bool = False) -> Scheduler:
    """Prefix caching off by default: these tests' prompts repeat, and they check the shapes
    of steps without sharing (tests/scheduler/test_prefix_cache.py covers it on)."""
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          max_waiting=max_waiting)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, prefix_caching))


def make_req(req_id: str, n_prompt: int, max_tokens: int = 16, eos: tuple[int, ...] = (),
             max_model_len: int = 1 << 30, **params) -> Request:
    # Prompt ids 1..n: never collide with the fake sampled ids (>= 100) used below.
    return Request(req_id, [1 + (i % 50) for i in range(n_prompt)],
                   SamplingParams(max_tokens=max_tokens, **params),
                   eos_token_ids=frozenset(eos), max_model_len=max_model_len)


def runner_output(out: SchedulerOutput, step: int, token_fn: TokenFn | None = None) -> ModelRunnerOutput:
    """Answer every `sample=True` entry with one fake token (100 + step by default), others with []."""
    sampled: list[list[int]] = []
    for s in out.scheduled:
        if s.sample:
            tok = token_fn(s, step) if token_fn else 100 + step
            sampled.append(list(tok) if isinstance(tok, list) else [tok])
        else:
            sampled.append([])
    return ModelRunnerOutput([s.req_id for s in out.scheduled], sampled)


def run_step(sched: Scheduler, step: int,
             token_fn: TokenFn | None = None) -> tuple[SchedulerOutput, list[RequestUpdate]]:
    out = sched.schedule()
    assert out.num_tokens <= sched.config.max_num_batched_tokens
    updates = sched.update_from_output(out, runner_output(out, step, token_fn))
    check_blocks(sched)
    return out, updates


def check_blocks(sched: Scheduler, extra: tuple[Request, ...] = ()) -> None:
    """Every block is either free or held by exactly one live request (no forks here)."""
    bm = sched.block_manager
    held: list[int] = []
    for r in list(sched.running) + list(sched.waiting) + list(extra):
        held.extend(r.block_table)
    free = list(bm._free)
    assert len(held) == len(set(held)), "a block is held twice"
    assert len(free) == len(set(free)), "a block is on the free list twice"
    assert set(held).isdisjoint(free)
    assert len(held) + bm.num_free_blocks == bm.num_blocks
    for b in range(bm.num_blocks):
        assert bm.ref_count(b) == (1 if b in set(held) else 0)
    for r in sched.waiting:
        assert r.block_table == [] and r.num_computed_tokens == 0
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
    assert len(sched.running) <= sched.config.max_num_seqs


def by_id(out: SchedulerOutput) -> dict[str, ScheduledRequest]:
    return {s.req_id: s for s in out.scheduled}


def shape(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    """(id, start_pos, num_tokens, sample) of each scheduled entry, in order."""
    return [(s.req_id, s.start_pos, s.num_tokens, s.sample) for s in out.scheduled]


# ---- single request -------------------------------------------------------------------


def test_single_request_prefill_then_decode():
    sched = make_sched(num_blocks=16, block_size=4)
    r = make_req("a", 10, max_tokens=5)
    sched.add_request(r)
    assert sched.num_waiting == 1 and sched.has_unfinished()

    out, ups = run_step(sched, 0)
    assert len(out.scheduled) == 1
    s = out.scheduled[0]
    assert s.req_id == "a"
    assert s.token_ids == r.prompt_ids
    assert s.start_pos == 0
    assert s.sample is True
    assert s.num_output_tokens == 0
    assert len(s.block_table) == 3  # 10 tokens / 4
    assert s.params is r.params
    assert r.status == RequestStatus.RUNNING
    assert r.first_scheduled_time is not None
    assert r.num_computed_tokens == 10
    assert r.output_ids == [100]
    assert ups == [RequestUpdate("a", [100], None, 10)]
    assert sched.num_running == 1 and sched.num_waiting == 0

    # decode steps: one token each, at the next position
    expected_blocks = {1: 3, 2: 3, 3: 4}  # KV of 11, 12, 13 tokens
    for step in (1, 2, 3):
        first_time = r.first_scheduled_time
        out, ups = run_step(sched, step)
        s = out.scheduled[0]
        assert s.token_ids == [100 + step - 1]
        assert s.start_pos == 9 + step
        assert s.sample is True
        assert s.num_output_tokens == step
        assert len(s.block_table) == expected_blocks[step]
        assert r.num_computed_tokens == 10 + step
        assert ups == [RequestUpdate("a", [100 + step], None, 10)]
        assert r.first_scheduled_time == first_time

    out, ups = run_step(sched, 4)
    assert ups == [RequestUpdate("a", [104], "length", 10)]
    assert r.status == RequestStatus.FINISHED_LENGTH
    assert r.output_ids == [100, 101, 102, 103, 104]
    assert r.num_computed_tokens == 14
    assert not sched.has_unfinished()
    assert "a" not in sched.requests
    assert sched.block_manager.usage == 0.0 and r.block_table == []

    out = sched.schedule()
    assert out.empty and out.finished_req_ids == ["a"]
    assert sched.schedule().finished_req_ids == []  # reported once


def test_empty_scheduler_schedules_nothing():
    sched = make_sched()
    out = sched.schedule()
    assert out.empty and out.scheduled == [] and out.finished_req_ids == [] and out.num_preempted == 0
    assert sched.update_from_output(out, ModelRunnerOutput([], [])) == []
    assert not sched.has_unfinished()


def test_chunked_prefill_by_budget():
    sched = make_sched(num_blocks=16, block_size=4, max_num_batched_tokens=8)
    r = make_req("a", 25, max_tokens=3)
    sched.add_request(r)

    chunks = []
    for step in range(4):
        out, ups = run_step(sched, step)
        (s,) = out.scheduled
        chunks.append((s.start_pos, s.num_tokens, s.sample, len(s.block_table)))
        assert s.token_ids == r.prompt_ids[s.start_pos:s.start_pos + s.num_tokens]
        assert s.num_output_tokens == 0
        assert r.num_computed_tokens == s.start_pos + s.num_tokens
        if s.sample:
            assert ups == [RequestUpdate("a", [100 + step], None, 25)]
        else:
            assert ups == []  # nothing sampled, nothing to report
            assert r.output_ids == []
    assert chunks == [(0, 8, False, 2), (8, 8, False, 4), (16, 8, False, 6), (24, 1, True, 7)]
    assert r.output_ids == [103]

    out, _ = run_step(sched, 4)
    assert shape(out) == [("a", 25, 1, True)]
    out, ups = run_step(sched, 5)
    assert ups[0].finish_reason == "length"
    assert r.output_ids == [103, 104, 105]


def test_prompt_exactly_budget_is_not_chunked():
    sched = make_sched(max_num_batched_tokens=8)
    sched.add_request(make_req("a", 8))
    out, _ = run_step(sched, 0)
    assert shape(out) == [("a", 0, 8, True)]


# ---- several requests -----------------------------------------------------------------


def test_budget_shared_running_first():
    sched = make_sched(num_blocks=64, block_size=4, max_num_batched_tokens=16)
    for rid, n in (("A", 10), ("B", 20), ("C", 5)):
        sched.add_request(make_req(rid, n, max_tokens=50))

    out, _ = run_step(sched, 0)
    assert shape(out) == [("A", 0, 10, True), ("B", 0, 6, False)]
    assert sched.num_waiting == 1  # C got no budget

    out, _ = run_step(sched, 1)
    # running A and B first (A decodes, B finishes its prompt), C gets the last token of budget
    assert shape(out) == [("A", 10, 1, True), ("B", 6, 14, True), ("C", 0, 1, False)]
    assert out.num_tokens == 16

    sched.add_request(make_req("D", 30, max_tokens=50))
    out, _ = run_step(sched, 2)
    assert shape(out) == [("A", 11, 1, True), ("B", 20, 1, True), ("C", 1, 4, True), ("D", 0, 10, False)]
    assert out.num_tokens == 16

    sched.add_request(make_req("E", 5, max_tokens=50))
    out, _ = run_step(sched, 3)
    # D is running now, so it is served before the waiting E, which gets nothing
    assert shape(out) == [("A", 12, 1, True), ("B", 21, 1, True), ("C", 5, 1, True), ("D", 10, 13, False)]
    assert sched.num_waiting == 1

    out, _ = run_step(sched, 4)
    assert shape(out) == [("A", 13, 1, True), ("B", 22, 1, True), ("C", 6, 1, True), ("D", 23, 7, True),
                          ("E", 0, 5, True)]
    assert out.num_tokens == 15


def test_running_decodes_can_exhaust_budget():
    sched = make_sched(max_num_batched_tokens=2)
    sched.add_request(make_req("A", 1, max_tokens=10))
    sched.add_request(make_req("B", 1, max_tokens=10))
    sched.add_request(make_req("C", 1, max_tokens=10))
    out, _ = run_step(sched, 0)
    assert [s.req_id for s in out.scheduled] == ["A", "B"]
    for step in range(1, 5):
        out, _ = run_step(sched, step)
        assert [s.req_id for s in out.scheduled] == ["A", "B"]
        assert sched.requests["C"].status == RequestStatus.WAITING


def test_budget_smaller_than_running_set_skips_younger_running():
    sched = make_sched(max_num_batched_tokens=3)
    for rid in "ABC":
        sched.add_request(make_req(rid, 1, max_tokens=10))
    out, _ = run_step(sched, 0)
    assert [s.req_id for s in out.scheduled] == ["A", "B", "C"]
    sched.config = SchedulerConfig(max_num_batched_tokens=2)  # shrink the budget
    out, _ = run_step(sched, 1)
    assert [s.req_id for s in out.scheduled] == ["A", "B"]
    c = sched.requests["C"]
    assert c.status == RequestStatus.RUNNING and c.num_computed_tokens == 1
    assert len(c.block_table) == 1


def test_max_num_seqs_cap():
    sched = make_sched(max_num_seqs=2)
    for i in range(4):
        sched.add_request(make_req(f"r{i}", 3, max_tokens=2))
    out, _ = run_step(sched, 0)
    assert [s.req_id for s in out.scheduled] == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 2
    out, ups = run_step(sched, 1)
    assert [s.req_id for s in out.scheduled] == ["r0", "r1"]
    assert [u.finish_reason for u in ups] == ["length", "length"]
    assert sched.num_running == 0
    out, _ = run_step(sched, 2)
    assert [s.req_id for s in out.scheduled] == ["r2", "r3"]
    assert out.finished_req_ids == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 0


def test_max_num_seqs_one_runs_strictly_in_order():
    sched = make_sched(max_num_seqs=1)
    for i in range(3):
        sched.add_request(make_req(f"r{i}", 2, max_tokens=3))
    order = []
    step = 0
    while sched.has_unfinished():
        out, _ = run_step(sched, step)
        assert len(out.scheduled) == 1
        order.append(out.scheduled[0].req_id)
        step += 1
    assert order == ["r0"] * 3 + ["r1"] * 3 + ["r2"] * 3


def test_fcfs_big_waiting_head_blocks_younger_small():
    # 8 blocks of 4. A takes 4 blocks; B needs 4 + 1 reserved for A > 4 free; C (1 block) would fit.
    sched = make_sched(num_blocks=8, block_size=4)
    a = make_req("A", 16, max_tokens=3)
    b = make_req("B", 16, max_tokens=2)
    c = make_req("C", 2, max_tokens=2)
    for r in (a, b, c):
        sched.add_request(r)

    seen: list[list[str]] = []
    step = 0
    while sched.has_unfinished():
        out, _ = run_step(sched, step)
        seen.append([s.req_id for s in out.scheduled])
        step += 1
        assert step < 50
    assert seen[0] == ["A"]
    assert seen[1] == ["A"]
    assert seen[2] == ["A"]  # A finishes here
    # B (4 blocks, nothing running) fits; only then may C (1 block + 1 reserved for B) follow
    assert seen[3] == ["B", "C"]
    first_b = next(i for i, ids in enumerate(seen) if "B" in ids)
    assert all("C" not in ids for ids in seen[:first_b]), "a younger request overtook the waiting head"
    assert b.output_ids and c.output_ids


def test_fcfs_waiting_head_gets_partial_chunk_younger_gets_nothing():
    sched = make_sched(max_num_batched_tokens=8)
    sched.add_request(make_req("big", 20))
    sched.add_request(make_req("small", 1))
    out, _ = run_step(sched, 0)
    assert shape(out) == [("big", 0, 8, False)]
    out, _ = run_step(sched, 1)
    assert shape(out) == [("big", 8, 8, False)]
    out, _ = run_step(sched, 2)
    assert shape(out) == [("big", 16, 4, True), ("small", 0, 1, True)]


# ---- finishing ------------------------------------------------------------------------


def drive(sched: Scheduler, token_fn: TokenFn | None = None, start: int = 0,
          max_steps: int = 200) -> dict[str, list[RequestUpdate]]:
    """Step until every request ended; returns each request's updates."""
    per_req: dict[str, list[RequestUpdate]] = {}
    step = start
    while sched.has_unfinished():
        _, ups = run_step(sched, step, token_fn)
        for u in ups:
            per_req.setdefault(u.req_id, []).append(u)
        step += 1
        assert step - start < max_steps, "scheduler made no progress"
    return per_req


def tokens_of(updates: list[RequestUpdate]) -> list[int]:
    return [t for u in updates for t in u.new_token_ids]


def test_finish_by_max_tokens():
    sched = make_sched()
    r = make_req("a", 3, max_tokens=4)
    sched.add_request(r)
    ups = drive(sched)["a"]
    assert tokens_of(ups) == [100, 101, 102, 103]
    assert [u.finish_reason for u in ups] == [None, None, None, "length"]
    assert r.status == RequestStatus.FINISHED_LENGTH
    assert r.status.finish_reason == "length"


def test_max_tokens_one_finishes_on_prefill():
    sched = make_sched()
    r = make_req("a", 5, max_tokens=1)
    sched.add_request(r)
    _out, ups = run_step(sched, 0)
    assert ups == [RequestUpdate("a", [100], "length", 5)]
    assert sched.block_manager.usage == 0.0
    assert sched.schedule().finished_req_ids == ["a"]


def test_finish_by_max_model_len():
    sched = make_sched()
    r = make_req("a", 5, max_tokens=100, max_model_len=8)
    sched.add_request(r)
    ups = drive(sched)["a"]
    assert tokens_of(ups) == [100, 101, 102]
    assert ups[-1].finish_reason == "length"


def eos_at(step_to_token: dict[int, int]) -> TokenFn:
    return lambda s, step: step_to_token.get(step, 100 + step)


def test_finish_by_eos():
    sched = make_sched()
    r = make_req("a", 3, max_tokens=10, eos=(2, 7))
    sched.add_request(r)
    ups = drive(sched, eos_at({3: 7}))["a"]
    assert tokens_of(ups) == [100, 101, 102, 7]  # the EOS token itself is reported
    assert ups[-1].finish_reason == "stop"
    assert r.status == RequestStatus.FINISHED_STOPPED
    assert r.output_ids == [100, 101, 102, 7]


def test_eos_of_other_request_does_not_stop():
    sched = make_sched()
    a = make_req("a", 3, max_tokens=4, eos=(2,))
    b = make_req("b", 3, max_tokens=4, eos=(7,))
    sched.add_request(a)
    sched.add_request(b)
    per = drive(sched, lambda s, step: 7 if step == 1 else 100 + step)
    assert tokens_of(per["a"]) == [100, 7, 102, 103]
    assert per["a"][-1].finish_reason == "length"
    assert tokens_of(per["b"]) == [100, 7]
    assert per["b"][-1].finish_reason == "stop"


def test_finish_by_stop_token_ids():
    sched = make_sched()
    r = make_req("a", 3, max_tokens=10, stop_token_ids=[55])
    sched.add_request(r)
    ups = drive(sched, eos_at({2: 55}))["a"]
    assert tokens_of(ups) == [100, 101, 55]
    assert ups[-1].finish_reason == "stop"


def test_ignore_eos():
    sched = make_sched()
    r = make_req("a", 3, max_tokens=5, eos=(7,), ignore_eos=True)
    sched.add_request(r)
    ups = drive(sched, eos_at({1: 7, 3: 7}))["a"]
    assert tokens_of(ups) == [100, 7, 102, 7, 104]
    assert ups[-1].finish_reason == "length"


def test_ignore_eos_still_honours_stop_token_ids():
    sched = make_sched()
    r = make_req("a", 3, max_tokens=10, eos=(7,), ignore_eos=True, stop_token_ids=[9])
    sched.add_request(r)
    ups = drive(sched, eos_at({1: 7, 2: 9}))["a"]
    assert tokens_of(ups) == [100, 7, 9]
    assert ups[-1].finish_reason == "stop"


def test_multi_token_step_stops_at_eos_and_drops_the_rest():
    sched = make_sched()
    r = make_req("a", 3, max_tokens=10, eos=(7,))
    sched.add_request(r)
    run_step(sched, 0)
    _out, ups = run_step(sched, 1, lambda s, step: [50, 7, 51, 52])
    assert ups == [RequestUpdate("a", [50, 7], "stop", 3)]
    assert r.output_ids == [100, 50, 7]


def test_multi_token_step_stops_at_max_tokens():
    sched = make_sched()
    r = make_req("a", 3, max_tokens=3)
    sched.add_request(r)
    _out, ups = run_step(sched, 0, lambda s, step: [50, 51, 52, 53, 54])
    assert ups == [RequestUpdate("a", [50, 51, 52], "length", 3)]


def test_multi_token_step_schedules_all_unverified_tokens():
    sched = make_sched(block_size=4)
    r = make_req("a", 3, max_tokens=20)
    sched.add_request(r)
    run_step(sched, 0, lambda s, step: [50, 51, 52])
    assert r.num_computed_tokens == 3 and r.num_tokens == 6
    out, _ = run_step(sched, 1)
    assert shape(out) == [("a", 3, 3, True)]
    assert out.scheduled[0].token_ids == [50, 51, 52]
    assert out.scheduled[0].num_output_tokens == 3
    assert len(out.scheduled[0].block_table) == 2


def test_blocks_freed_on_finish():
    sched = make_sched(num_blocks=16, block_size=4)
    reqs = [make_req(f"r{i}", 5 + i, max_tokens=2 + i) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    run_step(sched, 0)
    assert sched.block_manager.usage > 0
    drive(sched)
    assert sched.block_manager.usage == 0.0
    assert sched.block_manager.num_free_blocks == 16
    assert all(r.block_table == [] for r in reqs)
    assert all(sched.block_manager.ref_count(b) == 0 for b in range(16))
    assert sched.requests == {}
    assert sorted(sched.schedule().finished_req_ids) == ["r3"]  # earlier ones were reported earlier


def test_finished_ids_reported_exactly_once_in_order():
    sched = make_sched()
    for i, mt in enumerate((1, 3, 2)):
        sched.add_request(make_req(f"r{i}", 2, max_tokens=mt))
    reported = []
    step = 0
    while sched.has_unfinished() or step == 0:
        out, _ups = run_step(sched, step)
        reported.extend(out.finished_req_ids)
        step += 1
    reported.extend(sched.schedule().finished_req_ids)
    assert reported == ["r0", "r2", "r1"]


def test_request_id_reusable_after_finish_and_duplicates_rejected():
    sched = make_sched()
    sched.add_request(make_req("a", 2, max_tokens=1))
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_request(make_req("a", 2))
    run_step(sched, 0)
    assert "a" not in sched.requests
    sched.add_request(make_req("a", 2, max_tokens=1))
    out, ups = run_step(sched, 1)
    assert out.finished_req_ids == ["a"]  # the old one's report
    assert ups[0].finish_reason == "length"


# ---- abort ----------------------------------------------------------------------------


def test_abort_waiting_request():
    sched = make_sched(max_num_seqs=1)
    a, b = make_req("a", 4, max_tokens=5), make_req("b", 4, max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched, 0)
    assert b.status == RequestStatus.WAITING
    sched.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert b.status == RequestStatus.FINISHED_ABORTED
    assert b.status.finish_reason == "abort"
    assert "b" not in sched.requests and sched.num_waiting == 0
    check_blocks(sched)
    # unknown or already-ended ids are no-ops
    sched.finish_request("b", RequestStatus.FINISHED_ABORTED)
    sched.finish_request("nope", RequestStatus.FINISHED_ABORTED)
    out, _ = run_step(sched, 1)
    assert out.finished_req_ids == ["b"]
    assert [s.req_id for s in out.scheduled] == ["a"]


def test_abort_running_request_frees_blocks():
    sched = make_sched(num_blocks=16, block_size=4)
    a = make_req("a", 9, max_tokens=10)
    sched.add_request(a)
    run_step(sched, 0)
    assert len(a.block_table) == 3
    assert sched.block_manager.num_free_blocks == 13
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert a.block_table == []
    assert sched.block_manager.usage == 0.0
    assert sched.num_running == 0 and not sched.has_unfinished()
    out = sched.schedule()
    assert out.empty and out.finished_req_ids == ["a"]


def test_abort_mid_chunked_prefill():
    sched = make_sched(num_blocks=16, block_size=4, max_num_batched_tokens=4)
    a = make_req("a", 12)
    b = make_req("b", 3)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched, 0)
    assert a.num_computed_tokens == 4 and b.status == RequestStatus.WAITING
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert sched.block_manager.usage == 0.0
    out, _ = run_step(sched, 1)
    assert out.finished_req_ids == ["a"]
    assert shape(out) == [("b", 0, 3, True)]


def test_finish_request_from_outside_with_stop_status():
    sched = make_sched()
    a = make_req("a", 3)
    sched.add_request(a)
    run_step(sched, 0)
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)  # e.g. a stop string matched
    assert a.status == RequestStatus.FINISHED_STOPPED
    assert sched.block_manager.usage == 0.0
    assert sched.schedule().finished_req_ids == ["a"]


def test_finish_request_needs_a_finished_status():
    sched = make_sched()
    sched.add_request(make_req("a", 3))
    with pytest.raises(AssertionError):
        sched.finish_request("a", RequestStatus.RUNNING)


def test_update_ignores_request_aborted_while_its_step_ran():
    sched = make_sched(num_blocks=16, block_size=4)
    a, b = make_req("a", 5, max_tokens=10), make_req("b", 6, max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched, 0)
    out = sched.schedule()
    assert [s.req_id for s in out.scheduled] == ["a", "b"]
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    computed_before = a.num_computed_tokens
    tokens_before = list(a.token_ids)
    ups = sched.update_from_output(out, runner_output(out, 1))
    assert ups == [RequestUpdate("b", [101], None, 6)]
    assert a.num_computed_tokens == computed_before
    assert a.token_ids == tokens_before
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert a.block_table == []
    check_blocks(sched)
    assert sched.block_manager.num_free_blocks == 16 - len(b.block_table)
    out, _ = run_step(sched, 2)
    assert out.finished_req_ids == ["a"]
    assert [s.req_id for s in out.scheduled] == ["b"]


def test_update_ignores_result_of_aborted_id_reused_during_the_step():
    sched = make_sched()
    sched.add_request(make_req("a", 4, max_tokens=10))
    out = sched.schedule()
    sched.finish_request("a", RequestStatus.FINISHED_ABORTED)
    fresh = make_req("a", 2, max_tokens=10)
    sched.add_request(fresh)  # the id is free again once the old request ended
    ups = sched.update_from_output(out, runner_output(out, 0))
    assert ups == []
    assert fresh.status == RequestStatus.WAITING
    assert fresh.num_computed_tokens == 0 and fresh.output_ids == []
    out, _ = run_step(sched, 1)
    assert out.finished_req_ids == ["a"]
    assert shape(out) == [("a", 0, 2, True)]
    assert fresh.output_ids == [101]


def test_update_with_mismatched_runner_output_raises():
    sched = make_sched()
    sched.add_request(make_req("a", 3))
    sched.add_request(make_req("b", 3))
    out = sched.schedule()
    with pytest.raises(ValueError):
        sched.update_from_output(out, ModelRunnerOutput(["a"], [[1]]))
    with pytest.raises(AssertionError):
        sched.update_from_output(out, ModelRunnerOutput(["b", "a"], [[1], [2]]))


# ---- admission limits -----------------------------------------------------------------


def test_max_waiting_raises_capacity_exceeded():
    sched = make_sched(max_waiting=2, max_num_seqs=1)
    sched.add_request(make_req("r0", 2))
    sched.add_request(make_req("r1", 2))
    with pytest.raises(CapacityExceeded):
        sched.add_request(make_req("r2", 2))
    assert "r2" not in sched.requests and sched.num_waiting == 2
    run_step(sched, 0)  # r0 admitted: one slot free again
    assert sched.num_waiting == 1
    sched.add_request(make_req("r2", 2))
    with pytest.raises(CapacityExceeded):
        sched.add_request(make_req("r3", 2))


def test_max_waiting_zero_means_unlimited():
    sched = make_sched(max_waiting=0)
    for i in range(500):
        sched.add_request(make_req(f"r{i}", 1))
    assert sched.num_waiting == 500


# ---- preemption -----------------------------------------------------------------------


def test_preempt_newest_running_then_readmit_and_recompute():
    # 4 blocks of 4 tokens. A: prompt 6 (2 blocks). B: prompt 4 (1 block + 1 reserved for A).
    sched = make_sched(num_blocks=4, block_size=4)
    a = make_req("A", 6, max_tokens=10)
    b = make_req("B", 4, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    bm = sched.block_manager

    out, _ = run_step(sched, 0)
    assert [s.req_id for s in out.scheduled] == ["A", "B"]
    assert bm.num_free_blocks == 1
    run_step(sched, 1)  # B grows into the last block
    assert bm.num_free_blocks == 0
    out, _ = run_step(sched, 2)
    assert out.num_preempted == 0
    assert b.output_ids == [100, 101, 102]

    # A needs a third block: the newest running request (B) is preempted.
    out, _ = run_step(sched, 3)
    assert out.num_preempted == 1
    assert [s.req_id for s in out.scheduled] == ["A"]
    assert b.status == RequestStatus.PREEMPTED
    assert b.block_table == []
    assert b.num_computed_tokens == 0
    assert b.num_preemptions == 1
    assert sched.num_preemptions == 1
    assert list(sched.waiting) == [b]
    assert sched.running == [a]
    assert b.output_ids == [100, 101, 102]  # committed tokens survive preemption
    assert "B" in sched.requests
    assert len(a.block_table) == 3 and bm.num_free_blocks == 1
    first_time = b.first_scheduled_time
    assert first_time is not None

    # B (7 tokens: 2 blocks + 1 reserve) cannot come back while A holds 3 blocks.
    step = 4
    while a.status == RequestStatus.RUNNING:
        out, _ = run_step(sched, step)
        assert [s.req_id for s in out.scheduled] == ["A"]
        assert b.status == RequestStatus.PREEMPTED
        step += 1
    assert step == 10 and a.output_ids == [100 + i for i in range(10)]

    # B is re-admitted and recomputes prompt + committed outputs in one go.
    out, ups = run_step(sched, step)
    assert out.finished_req_ids == ["A"]
    (s,) = out.scheduled
    assert s.req_id == "B" and s.start_pos == 0
    assert s.token_ids == b.prompt_ids + [100, 101, 102]
    assert s.sample is True
    assert s.num_output_tokens == 3
    assert len(s.block_table) == 2
    assert b.status == RequestStatus.RUNNING
    assert b.first_scheduled_time == first_time  # the first admission time is kept
    assert ups == [RequestUpdate("B", [110], None, 4)]  # only the new token is reported

    per = drive(sched, start=step + 1)
    assert tokens_of(per["B"]) == [111, 112]
    assert per["B"][-1].finish_reason == "length"
    assert b.output_ids == [100, 101, 102, 110, 111, 112]
    assert b.num_preemptions == 1
    assert bm.usage == 0.0


def test_preemption_blocks_admission_in_that_step():
    sched = make_sched(num_blocks=4, block_size=4)
    a = make_req("A", 6, max_tokens=10)
    b = make_req("B", 4, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    for step in range(3):
        run_step(sched, step)
    sched.add_request(make_req("C", 1, max_tokens=1))
    out, _ = run_step(sched, 3)  # A preempts B; after that 1 block is free
    assert out.num_preempted == 1
    assert [s.req_id for s in out.scheduled] == ["A"]
    assert [r.req_id for r in sched.waiting] == ["B", "C"]  # preempted B first, FCFS kept


def test_no_readmission_in_the_step_that_preempted():
    # 5 blocks of 4. A: prompt 5 (2 blocks), B: prompt 8 (2 blocks + 1 reserved for A).
    sched = make_sched(num_blocks=5, block_size=4, max_num_batched_tokens=13)
    a = make_req("A", 5, max_tokens=12)
    b = make_req("B", 8, max_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    for step in range(4):
        out, _ = run_step(sched, step)
        assert out.num_preempted == 0
    assert len(a.block_table) == 2 and len(b.block_table) == 3
    assert sched.block_manager.num_free_blocks == 0
    # With a 2-token budget, B's recompute chunk (1 token: 1 block + 1 reserved) would fit in
    # the 2 blocks left after A grows; it must still wait a step to avoid thrashing.
    sched.config = SchedulerConfig(max_num_batched_tokens=2)
    out, _ = run_step(sched, 4)
    assert out.num_preempted == 1
    assert shape(out) == [("A", 8, 1, True)]
    assert b.status == RequestStatus.PREEMPTED
    assert sched.block_manager.num_free_blocks == 2
    out, _ = run_step(sched, 5)
    assert out.num_preempted == 0
    assert shape(out) == [("A", 9, 1, True), ("B", 0, 1, False)]
    assert b.status == RequestStatus.RUNNING


def test_preempt_several_victims_newest_first():
    # 5 blocks of 4. A, B, C take 1 block each; a 13-token spec step makes A need 4 blocks.
    sched = make_sched(num_blocks=5, block_size=4)
    a, b, c = (make_req(x, 4, max_tokens=16) for x in "ABC")  # each fits the pool alone
    for r in (a, b, c):
        sched.add_request(r)
    out, _ = run_step(sched, 0, lambda s, step: list(range(200, 213)) if s.req_id == "A" else 100)
    assert [s.req_id for s in out.scheduled] == ["A", "B", "C"]
    assert a.num_tokens == 17 and sched.block_manager.num_free_blocks == 2

    out, _ = run_step(sched, 1)
    assert out.num_preempted == 2
    assert shape(out) == [("A", 4, 13, True)]
    assert len(a.block_table) == 5
    assert [r.req_id for r in sched.waiting] == ["B", "C"]
    assert b.status == c.status == RequestStatus.PREEMPTED
    assert sched.num_preemptions == 2

    per = drive(sched)
    assert len(a.output_ids) == len(b.output_ids) == len(c.output_ids) == 16
    assert per["A"][-1].finish_reason == "length"
    assert sched.block_manager.usage == 0.0


def test_request_preempts_itself_when_it_is_the_newest():
    # A and B hold 2 blocks each of 4; B's multi-token step leaves it needing a block with none
    # free. B is the newest running request, so B itself is preempted and A still runs.
    sched = make_sched(num_blocks=4, block_size=4)
    a = make_req("A", 5, max_tokens=10)  # each fits the 16-token pool alone
    b = make_req("B", 4, max_tokens=10)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = run_step(sched, 0)
    assert [s.req_id for s in out.scheduled] == ["A", "B"]
    assert sched.block_manager.num_free_blocks == 1
    run_step(sched, 1, lambda s, step: [7, 8, 9, 10, 11] if s.req_id == "B" else 100)
    # B: 4 + 6 = 10 tokens, 5 computed, holds 2 blocks, needs 3; A holds 2; 0 free.
    assert b.num_tokens == 10 and len(b.block_table) == 2
    assert sched.block_manager.num_free_blocks == 0
    out, _ = run_step(sched, 2)
    assert out.num_preempted == 1
    assert [s.req_id for s in out.scheduled] == ["A"]
    assert b.status == RequestStatus.PREEMPTED and sched.running == [a]
    assert a.status == RequestStatus.RUNNING
    drive(sched)
    assert len(b.output_ids) == 10 and b.output_ids[:6] == [100, 7, 8, 9, 10, 11]


def test_preempted_request_can_be_aborted():
    sched = make_sched(num_blocks=4, block_size=4)
    a = make_req("A", 6, max_tokens=10)
    b = make_req("B", 4, max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    for step in range(4):
        run_step(sched, step)
    assert b.status == RequestStatus.PREEMPTED
    free = sched.block_manager.num_free_blocks
    sched.finish_request("B", RequestStatus.FINISHED_ABORTED)
    assert b.status == RequestStatus.FINISHED_ABORTED
    assert sched.num_waiting == 0
    assert sched.block_manager.num_free_blocks == free
    out, _ = run_step(sched, 4)
    assert out.finished_req_ids == ["B"]


def test_preempted_request_recompute_is_chunked_by_budget():
    sched = make_sched(num_blocks=4, block_size=4, max_num_batched_tokens=4)
    a = make_req("A", 4, max_tokens=9)
    b = make_req("B", 3, max_tokens=9)
    sched.add_request(a)
    sched.add_request(b)
    step = 0
    while b.num_preemptions == 0:
        run_step(sched, step)
        step += 1
        assert step < 50
    n_out = b.num_output_tokens
    assert n_out > 0
    # recompute of prompt + outputs goes in budget-sized chunks, sampling only at the end
    recompute = []
    while True:
        out, ups = run_step(sched, step)
        step += 1
        s = by_id(out).get("B")
        if s is None:
            continue
        recompute.append((s.start_pos, s.num_tokens, s.sample))
        assert s.num_output_tokens == n_out
        if s.sample:
            break
        assert not any(u.req_id == "B" for u in ups)
    total = 3 + n_out
    assert recompute[0][0] == 0
    assert sum(n for _, n, _ in recompute) == total
    assert all(n <= 4 for _, n, _ in recompute)
    drive(sched)
    assert len(b.output_ids) == 9


# ---- random workload ------------------------------------------------------------------


def _tok(i: int, k: int) -> int:
    """The fake model's k-th output token of request i: deterministic, unique per request."""
    return 1000 * (i + 1) + k


def _run_workload(seed: int, multi_token: bool, aborts: bool) -> None:
    rng = random.Random(seed)
    block_size, num_blocks = 4, 12
    budget, max_seqs = 16, 5
    sched = make_sched(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_seqs,
                       max_num_batched_tokens=budget)
    bm = sched.block_manager

    n_reqs = 20
    arrivals = sorted(rng.randint(0, 40) for _ in range(n_reqs))
    reqs: list[Request] = []
    expected_out: list[list[int]] = []
    expected_reason: list[str] = []
    for i in range(n_reqs):
        n_prompt = rng.randint(1, 20)
        max_tokens = rng.randint(1, 20)  # prompt + outputs <= 40 tokens <= 48 slots: each fits alone
        outs = [_tok(i, k) for k in range(max_tokens)]
        eos: tuple[int, ...] = ()
        reason = "length"
        if rng.random() < 0.25 and max_tokens > 1:
            k_stop = rng.randrange(max_tokens - 1)
            eos = (_tok(i, k_stop),)
            outs = outs[:k_stop + 1]
            reason = "stop"
        reqs.append(Request(f"r{i}", [rng.randint(1, 999) for _ in range(n_prompt)],
                            SamplingParams(max_tokens=max_tokens), eos_token_ids=frozenset(eos)))
        expected_out.append(outs)
        expected_reason.append(reason)
    index = {r.req_id: i for i, r in enumerate(reqs)}
    full_seq = [r.prompt_ids + [_tok(i, k) for k in range(r.params.max_tokens)]
                for i, r in enumerate(reqs)]

    kv: dict[int, list[int | None]] = {b: [None] * block_size for b in range(num_blocks)}
    got: dict[str, list[int]] = {r.req_id: [] for r in reqs}
    reasons: dict[str, str] = {}
    reported_finished: list[str] = []
    aborted: set[str] = set()
    total_preempted = 0
    recomputed_outputs = False
    next_req = 0
    step = 0
    while next_req < n_reqs or sched.has_unfinished():
        assert step < 1000, "starvation: requests never finished"
        while next_req < n_reqs and arrivals[next_req] <= step:
            sched.add_request(reqs[next_req])
            next_req += 1
        if aborts and rng.random() < 0.03 and sched.requests:
            victim = rng.choice(sorted(sched.requests))
            sched.finish_request(victim, RequestStatus.FINISHED_ABORTED)
            aborted.add(victim)

        out = sched.schedule()
        reported_finished.extend(out.finished_req_ids)
        total_preempted += out.num_preempted
        ids = [s.req_id for s in out.scheduled]
        assert len(ids) == len(set(ids)), "a request was scheduled twice in one step"
        assert out.num_tokens <= budget
        assert len(out.scheduled) <= max_seqs
        assert set(ids) <= {r.req_id for r in sched.running}
        check_blocks(sched)
        # FCFS: running (oldest first) then waiting are always in arrival order
        order = [index[r.req_id] for r in list(sched.running) + list(sched.waiting)]
        assert order == sorted(order)
        assert {r.req_id for r in list(sched.running) + list(sched.waiting)} == set(sched.requests)

        # the fake runner: write each chunk's KV through its block table, then read back the
        # whole context of each request and compare it with what the request must contain
        sampled: list[list[int]] = []
        for s in out.scheduled:
            req = sched.requests[s.req_id]
            i = index[s.req_id]
            end = s.start_pos + s.num_tokens
            assert s.num_tokens >= 1
            assert s.start_pos == req.num_computed_tokens
            assert s.token_ids == full_seq[i][s.start_pos:end]
            assert len(s.block_table) == cdiv(end, block_size)
            assert s.sample == (end == req.num_tokens)
            assert s.num_output_tokens == req.num_output_tokens
            if s.start_pos == 0 and s.num_output_tokens > 0:
                recomputed_outputs = True
            for j, t in enumerate(s.token_ids):
                pos = s.start_pos + j
                kv[s.block_table[pos // block_size]][pos % block_size] = t
        for s in out.scheduled:
            i = index[s.req_id]
            end = s.start_pos + s.num_tokens
            ctx = [kv[s.block_table[p // block_size]][p % block_size] for p in range(end)]
            assert ctx == full_seq[i][:end], f"KV of {s.req_id} corrupted"
            if s.sample:
                m = s.num_output_tokens
                n = rng.randint(1, 3) if multi_token else 1
                sampled.append([_tok(i, k) for k in range(m, m + n)])
            else:
                sampled.append([])

        # abort between schedule and update: the result must be dropped
        if aborts and out.scheduled and rng.random() < 0.03:
            victim = rng.choice(ids)
            sched.finish_request(victim, RequestStatus.FINISHED_ABORTED)
            aborted.add(victim)

        ups = sched.update_from_output(out, ModelRunnerOutput(ids, sampled))
        for u in ups:
            assert u.req_id not in reasons
            assert u.num_prompt_tokens == reqs[index[u.req_id]].num_prompt_tokens
            got[u.req_id].extend(u.new_token_ids)
            if u.finish_reason is not None:
                reasons[u.req_id] = u.finish_reason
        check_blocks(sched)
        for r in sched.running:
            assert len(r.block_table) == cdiv(r.num_computed_tokens, block_size)
        step += 1

    reported_finished.extend(sched.schedule().finished_req_ids)
    assert sorted(reported_finished) == sorted(r.req_id for r in reqs), "each request ends once"
    assert bm.usage == 0.0 and bm.num_free_blocks == num_blocks
    assert all(bm.ref_count(b) == 0 for b in range(num_blocks))
    assert sched.requests == {} and not sched.running and not sched.waiting
    for i, r in enumerate(reqs):
        assert r.block_table == []
        if r.req_id in aborted:
            assert r.status == RequestStatus.FINISHED_ABORTED
            assert got[r.req_id] == expected_out[i][:len(got[r.req_id])]
            assert r.req_id not in reasons
            continue
        assert got[r.req_id] == expected_out[i], f"{r.req_id} lost or repeated tokens"
        assert r.output_ids == expected_out[i]
        assert reasons[r.req_id] == expected_reason[i]
        assert r.status.finish_reason == expected_reason[i]
    assert total_preempted == sched.num_preemptions == sum(r.num_preemptions for r in reqs)
    if not aborts:
        assert sched.num_preemptions > 0, "the workload was meant to exercise preemption"
        assert recomputed_outputs, "no preempted request recomputed its outputs"


@pytest.mark.parametrize("seed", range(8))
def test_random_workload_invariants_and_no_starvation(seed):
    _run_workload(seed, multi_token=False, aborts=False)


@pytest.mark.parametrize("seed", range(8))
def test_random_workload_multi_token_steps(seed):
    _run_workload(seed, multi_token=True, aborts=False)


@pytest.mark.parametrize("seed", range(8))
def test_random_workload_with_aborts(seed):
    _run_workload(seed, multi_token=False, aborts=True)


# ---- the drafter's room -----------------------------------------------------------------


class _RoomPolicy(FixedVerify):
    """Verifies every draft; hands out a set room and records the drafting times it is shown."""

    def __init__(self, room: DraftRoom) -> None:
        super().__init__()
        self.room, self.seen = room, []

    def draft_room(self) -> DraftRoom:
        return self.room

    def observe_draft_seconds(self, seconds: float) -> None:
        self.seen.append(seconds)


def _drafted_output(out: SchedulerOutput, step: int) -> ModelRunnerOutput:
    """One token per sampling request, and a one-token proposal from the requests given room."""
    res = runner_output(out, step)
    res.draft_token_ids = [[7] if s.sample and s.max_draft_positions != 0 else [] for s in out.scheduled]
    res.draft_confidences = [None] * len(out.scheduled)
    res.draft_sources = ["d"] * len(out.scheduled)
    res.draft_pass_seconds = 0.01 * (step + 1)
    return res


def test_a_probe_room_goes_to_a_few_sampling_requests_in_turn():
    """A probe (positions 1, at most 4 requests) gives room to 4 of the 10 decoding requests,
    a different 4 each step until all had their turn; the other requests get 0. A full room
    gives every request the same positions."""
    sched = make_sched(num_blocks=256)
    for i in range(10):
        sched.add_request(make_req(f"r{i}", 5, max_tokens=50))
    sched.verify_policy = _RoomPolicy(DraftRoom(1, 4))
    turns = []
    for step in range(3):
        out, _ = run_step(sched, step)
        assert out.draft_probe
        rooms = {s.req_id: s.max_draft_positions for s in out.scheduled}
        assert sorted(rooms.values()) == [0] * 6 + [1] * 4
        turns.append({r for r, n in rooms.items() if n})
    assert set().union(*turns) == {f"r{i}" for i in range(10)}
    assert not turns[0] & turns[1] and len(turns[2] - turns[0] - turns[1]) == 2
    sched.verify_policy.room = DraftRoom(3)
    out, _ = run_step(sched, 3)
    assert not out.draft_probe and {s.max_draft_positions for s in out.scheduled} == {3}


def test_probe_passes_do_not_count_as_the_drafting_time():
    """The verify policy charges a step that drafts for everyone the measured time of a full
    pass; a probe drafts for a few requests, so its pass time is not shown to the policy."""
    sched = make_sched(num_blocks=256)
    for i in range(8):
        sched.add_request(make_req(f"r{i}", 5, max_tokens=50))
    policy = sched.verify_policy = _RoomPolicy(DraftRoom(1, 4))
    for step in range(4):
        if step == 2:
            policy.room = DraftRoom()
        out = sched.schedule()
        sched.update_from_output(out, _drafted_output(out, step))
    assert policy.seen == [0.03, 0.04]


def test_a_proposal_remembers_whether_a_probe_made_it():
    """The verify policy verifies a probe's proposal even while it rests: each request's
    proposal carries whether the step that drafted it was a probe, and a full pass clears it."""
    sched = make_sched(num_blocks=256)
    for i in range(8):
        sched.add_request(make_req(f"r{i}", 5, max_tokens=50))
    policy = sched.verify_policy = _RoomPolicy(DraftRoom(1, 4))
    out = sched.schedule()
    sched.update_from_output(out, _drafted_output(out, 0))
    probed = {r.req_id for r in sched.running if r.draft_probe}
    assert len(probed) == 4 and all(sched.requests[r].draft_token_ids == [7] for r in probed)
    policy.room = DraftRoom()
    out = sched.schedule()
    sched.update_from_output(out, _drafted_output(out, 1))
    assert not any(r.draft_probe for r in sched.running)


class _RestingPolicy(_RoomPolicy):
    """Rests the drafter (probes of one position for at most 2 requests) with a pool of 2."""

    def __init__(self) -> None:
        super().__init__(DraftRoom(1, 2))

    @property
    def context_pool(self) -> int | None:
        return 2


def test_while_the_drafter_rests_only_its_probes_pool_keeps_drafter_context():
    """Admitted while resting, two requests keep drafter context and the rest decode plain
    for life: no room, not even a probe's (tests/scheduler/test_prefix_cache.py: their cached
    blocks are marked). Once the policy
    drafts again, new admissions keep context; the plain ones stay plain."""
    sched = make_sched(num_blocks=256, prefix_caching=True)
    sched.verify_policy = _RestingPolicy()
    for i in range(5):
        sched.add_request(make_req(f"r{i}", 5 + i, max_tokens=40))
    for step in range(4):
        out, _ = run_step(sched, step)
        warm = {s.req_id for s in out.scheduled if s.draft_context}
        assert warm == {"r0", "r1"}
        assert all(s.max_draft_positions == 0 for s in out.scheduled if s.req_id not in warm)
    assert not sched.requests["r4"].draft_context
    sched.verify_policy = _RoomPolicy(DraftRoom(3))
    sched.add_request(make_req("late", 3, max_tokens=40))
    out, _ = run_step(sched, 4)
    rooms = {s.req_id: s.max_draft_positions for s in out.scheduled}
    assert rooms["late"] == 3 and rooms["r0"] == 3 and rooms["r4"] == 0


def test_a_first_admission_onto_blocks_without_drafter_context_decodes_plain():
    """The target's KV of a cached prefix is reused either way; a new request whose hit lacks
    the drafter's context takes it and decodes plain, instead of drafting from a context that
    was never written."""
    sched = make_sched(num_blocks=256, prefix_caching=True)
    sched.verify_policy = _RoomPolicy(DraftRoom(3))
    first = make_req("first", 12, max_tokens=2)
    first.draft_context = False
    sched.add_request(first)
    for step in range(3):
        run_step(sched, step)
    again = make_req("again", 13, max_tokens=4)
    sched.add_request(again)
    out, _ = run_step(sched, 3)
    (s,) = out.scheduled
    assert s.start_pos == 12 and not s.draft_context and s.max_draft_positions == 0


def test_a_readmitted_request_that_drafts_takes_only_the_prefix_with_drafter_context():
    """A preempted request that keeps drafter context finds its prefix cached by a request
    without it: it takes only the blocks before the first marked one (and recomputes the rest,
    whose drafter context it needs); one that decodes plain takes the whole hit."""
    sched = make_sched(num_blocks=64, prefix_caching=True)
    bm = sched.block_manager
    warm_owner, cold_owner = make_req("w", 4), make_req("c", 12)
    cold_owner.draft_context = False
    for owner, n in ((warm_owner, 4), (cold_owner, 12)):
        hit = bm.cached_prefix(owner)
        bm.take(owner, hit)
        bm.allocate(owner, n)
        owner.num_computed_tokens = n
        bm.cache_blocks(owner)  # the cold owner keys blocks 2 and 3; block 1 is the warm one's
    readmitted = make_req("r", 13)
    readmitted.first_scheduled_time = 1.0  # admitted before, then preempted
    hit = bm.cached_prefix(readmitted)
    assert len(hit) == 3
    assert sched._with_draft_context(readmitted, hit) == hit[:1] and readmitted.draft_context
    plain = make_req("p", 13)
    plain.first_scheduled_time, plain.draft_context = 1.0, False
    assert sched._with_draft_context(plain, hit) == hit
