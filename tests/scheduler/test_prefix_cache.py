"""The automatic prefix cache, with hand-built requests: hash chains, partial-block tails,
eviction order, reference counts under preemption and rollback, cache_salt isolation."""

import random

import pytest

from scheduler.block_manager import BlockManager, block_hash, chain_root
from scheduler.outputs import ModelRunnerOutput, SchedulerOutput
from scheduler.request import Request, RequestStatus
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import Scheduler, SchedulerConfig

BS = 4


def make_req(req_id: str, tokens: list[int], salt: str | None = None, max_tokens: int = 8,
             **params) -> Request:
    return Request(req_id, list(tokens), SamplingParams(max_tokens=max_tokens, **params), cache_salt=salt)


def commit(bm: BlockManager, req: Request, num_tokens: int) -> None:
    """What a step does to a request: KV for its first `num_tokens` tokens, then keys."""
    bm.allocate(req, num_tokens)
    req.num_computed_tokens = num_tokens
    bm.cache_blocks(req)


def admit(bm: BlockManager, req: Request) -> int:
    hit = bm.cached_prefix(req)
    assert bm.can_take(req, hit, req.num_tokens)
    return bm.take(req, hit)


def check_pool(bm: BlockManager, *owners: Request) -> None:
    """Reference counts equal owners; the free queue holds exactly the unreferenced blocks;
    every key maps to a block that carries it."""
    counts: dict[int, int] = {}
    for r in owners:
        for b in r.block_table:
            counts[b] = counts.get(b, 0) + 1
    for b in range(bm.num_blocks):
        assert bm.ref_count(b) == counts.get(b, 0)
    assert set(bm._free) == {b for b in range(bm.num_blocks) if b not in counts}
    assert {bm._cached[k]: k for k in bm._cached} == bm._hash_of
    s = bm.stats()
    assert s.num_cached_free_blocks == sum(1 for b in bm._free if b in bm._hash_of)
    assert s.num_referenced_blocks + s.num_cached_free_blocks + s.num_empty_blocks == bm.num_blocks


# ---- hash chains ----------------------------------------------------------------------


def test_a_key_fixes_the_whole_prefix_and_the_salt():
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    root = chain_root(None)
    assert block_hash(root, a) == block_hash(root, list(a))
    # the same second block after a different first block is a different key
    assert block_hash(block_hash(root, a), b) != block_hash(block_hash(root, [1, 2, 3, 9]), b)
    assert block_hash(chain_root("tenant-1"), a) != block_hash(root, a)
    assert chain_root("") == chain_root(None)  # an empty salt is no salt


def test_second_request_reuses_full_blocks_and_computes_the_tail():
    bm = BlockManager(16, BS)
    first = make_req("a", list(range(10)))  # 2 full blocks + a 2-token tail
    assert admit(bm, first) == 0
    commit(bm, first, 10)
    assert len(bm._cached) == 2  # the partial tail block is not keyed
    second = make_req("b", list(range(10)) + [77])
    assert bm.cached_prefix(second) == first.block_table[:2]
    assert admit(bm, second) == 8
    assert second.block_table == first.block_table[:2]
    assert bm.ref_count(first.block_table[0]) == 2
    check_pool(bm, first, second)
    assert bm.stats().queries == 10 + 11 and bm.stats().hits == 8


@pytest.mark.parametrize("num_tokens, cached", [(8, 4), (9, 8), (12, 8), (13, 12)])
def test_the_last_token_is_always_computed(num_tokens, cached):
    bm = BlockManager(16, BS)
    donor = make_req("a", list(range(16)))
    commit(bm, donor, 16)
    assert admit(bm, make_req("b", list(range(num_tokens)))) == cached


def test_a_divergent_token_ends_the_hit_at_its_block():
    bm = BlockManager(16, BS)
    donor = make_req("a", list(range(12)))
    commit(bm, donor, 12)
    tokens = list(range(12)) + [99]
    tokens[5] = 99  # inside the second block
    assert admit(bm, make_req("b", tokens)) == 4


def test_cache_salt_isolates_tenants():
    bm = BlockManager(16, BS)
    commit(bm, make_req("a", list(range(9)), salt="alice"), 9)
    assert admit(bm, make_req("b", list(range(9)), salt="bob")) == 0
    assert admit(bm, make_req("c", list(range(9)))) == 0
    assert admit(bm, make_req("d", list(range(9)), salt="alice")) == 8


def test_prompt_logprobs_requests_compute_every_position():
    bm = BlockManager(16, BS)
    commit(bm, make_req("a", list(range(9))), 9)
    assert bm.cached_prefix(make_req("b", list(range(9)), prompt_logprobs=0)) == []


def test_disabled_cache_keys_nothing_and_finds_nothing():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    commit(bm, make_req("a", list(range(9))), 9)
    assert not bm._cached and bm.cached_prefix(make_req("b", list(range(9)))) == []


# ---- eviction ---------------------------------------------------------------------------


def test_unkeyed_blocks_go_first_then_least_recently_freed_and_later_blocks_first():
    bm = BlockManager(8, BS)
    old = make_req("old", [1] * 8 + [2])  # 2 keyed blocks + 1 unkeyed tail
    commit(bm, old, 9)
    new = make_req("new", [3] * 8 + [4])
    commit(bm, new, 9)
    old_keyed, old_tail = old.block_table[:2], old.block_table[2]
    new_keyed, new_tail = new.block_table[:2], new.block_table[2]
    bm.free(old)
    bm.free(new)
    check_pool(bm)
    order = list(bm._free)
    empty = [b for b in order if b not in bm._hash_of]
    # blocks holding nothing reusable first, then old's chain (its last block first), then new's
    assert {old_tail, new_tail} <= set(empty) and order[:len(empty)] == empty
    assert order[len(empty):] == [old_keyed[1], old_keyed[0], new_keyed[1], new_keyed[0]]
    # taking 5 fresh blocks takes the 4 empty ones, then the end of old's chain
    grab = make_req("grab", [9] * 20)
    bm.allocate(grab, 5 * BS)
    assert len(bm.cached_prefix(make_req("o2", [1] * 8 + [2]))) == 1  # old lost the end of its chain
    assert len(bm.cached_prefix(make_req("n2", [3] * 8 + [4]))) == 2


def test_a_hit_on_an_idle_cached_block_takes_it_out_of_the_free_queue():
    bm = BlockManager(3, BS)
    donor = make_req("a", [1] * 8 + [2])
    commit(bm, donor, 9)
    bm.free(donor)
    user = make_req("b", [1] * 8 + [5, 6, 7, 8, 9])  # needs 2 cached + 2 new: 4 > 3 blocks
    hit = bm.cached_prefix(user)
    assert len(hit) == 2 and not bm.can_take(user, hit, user.num_tokens)
    assert bm.can_take(user, hit, 12)  # 2 cached + 1 new
    bm.take(user, hit)
    assert bm.num_free_blocks == 1
    bm.allocate(user, 12)
    check_pool(bm, user)


# ---- reference counts under preemption and rollback -----------------------------------


def test_rollback_releases_only_unkeyed_blocks_and_keys_only_committed_ones():
    bm = BlockManager(16, BS)
    req = make_req("a", list(range(6)))
    bm.allocate(req, 6 + 5)  # prompt + 5 draft positions: 3 blocks
    req.token_ids += [50, 51]  # one draft accepted, then the bonus token
    req.num_computed_tokens = 7  # 6 prompt + 1 accepted draft have KV
    bm.cache_blocks(req)
    assert len(bm._cached) == 1  # block 1 (positions 4..7) is not full of committed KV
    bm.rollback(req, 7)
    assert len(req.block_table) == 2
    check_pool(bm, req)


def test_shared_blocks_outlive_a_preempted_owner_and_a_readmitted_one_finds_its_own():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager(32, BS))
    a = make_req("a", list(range(12)), max_tokens=20)
    sched.add_request(a)
    _run(sched, 1)
    b = make_req("b", list(range(12)) + [99], max_tokens=20)
    sched.add_request(b)
    out, _ = _run(sched, 1)
    assert {s.req_id: s.start_pos for s in out.scheduled}["b"] == 12  # three blocks from a
    shared = a.block_table[:3]
    assert all(sched.block_manager.ref_count(x) == 2 for x in shared)
    sched._preempt(b)
    sched.running.remove(b)
    assert all(sched.block_manager.ref_count(x) == 1 for x in shared)  # a keeps them
    check_pool(sched.block_manager, a)
    out, _ = _run(sched, 1)  # b comes back: its prompt and output prefix are cached
    assert {s.req_id: s.start_pos for s in out.scheduled}["b"] == 12
    assert b.num_cached_tokens == 12  # usage reports the first admission's hit


def _run(sched: Scheduler, steps: int, rng: random.Random | None = None
         ) -> tuple[SchedulerOutput, list]:
    for _ in range(steps):
        out = sched.schedule()
        sampled = [[100 + len(s.token_ids)] if s.sample else [] for s in out.scheduled]
        updates = sched.update_from_output(out, ModelRunnerOutput([s.req_id for s in out.scheduled], sampled))
    return out, updates


# ---- a randomised workload against a model of the KV -----------------------------------


def test_random_shared_prefix_workload_reads_only_kv_of_its_own_tokens():
    """Requests with shared prefixes, drafts with rejections, preemption in a tiny pool and
    aborts. A fake KV store records which token each slot holds; every step checks that each
    scheduled request's earlier positions hold its own tokens (what a hit must guarantee),
    and that the pool's accounting is exact. At the end nothing is referenced."""
    rng = random.Random(0)
    bm = BlockManager(14, BS)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32, verify_policy="fixed"), bm)
    kv: dict[int, tuple[int, ...]] = {}  # slot -> the tokens up to the one whose KV it holds
    # prefixes made of a few shared blocks in different orders: equal blocks after different
    # parents must not match
    chunks = [[rng.randrange(1, 40) for _ in range(BS)] for _ in range(3)]
    prefixes = [[t for _ in range(rng.randrange(1, 4)) for t in rng.choice(chunks)] for _ in range(6)]
    hits = 0
    for step in range(400):
        if rng.random() < 0.3 and len(sched.requests) < 10:
            tokens = rng.choice(prefixes) + [rng.randrange(1, 40) for _ in range(rng.randrange(0, 6))]
            sched.add_request(make_req(f"r{step}", tokens, max_tokens=rng.randrange(1, 24),
                                       salt=rng.choice([None, None, "t"])))
        if sched.requests and rng.random() < 0.05:
            sched.finish_request(rng.choice(list(sched.requests)), RequestStatus.FINISHED_ABORTED)
        out = sched.schedule()
        for s in out.scheduled:
            req = sched.requests[s.req_id]
            for pos in range(s.start_pos):  # what attention reads: must be this request's KV
                slot = s.block_table[pos // BS] * BS + pos % BS
                assert kv[slot] == tuple(req.token_ids[:pos + 1]), f"{s.req_id} reads a foreign KV at {pos}"
            written = req.token_ids[:s.start_pos] + s.token_ids  # drafts included
            for pos in range(s.start_pos, len(written)):  # a position's KV depends on its whole prefix
                kv[s.block_table[pos // BS] * BS + pos % BS] = tuple(written[:pos + 1])
            hits += s.start_pos > 0 and req.num_cached_tokens > 0
        sampled, drafts = [], []
        for s in out.scheduled:
            if not s.sample:
                sampled.append([])
            else:  # accept a random prefix of the drafts (their KV is the drafts' own tokens)
                accepted = s.token_ids[len(s.token_ids) - s.num_draft_tokens:][:rng.randrange(0, s.num_draft_tokens + 1)]
                sampled.append(accepted + [rng.randrange(1, 40)])
            drafts.append([rng.randrange(1, 40) for _ in range(rng.randrange(0, 4))])
        sched.update_from_output(out, ModelRunnerOutput([s.req_id for s in out.scheduled], sampled,
                                                        draft_token_ids=drafts))
        check_pool(bm, *[r for r in sched.requests.values() if r.block_table])
    while sched.has_unfinished():
        _run(sched, 1)
    check_pool(bm)
    assert bm.stats().num_referenced_blocks == 0 and bm.stats().num_cached_free_blocks > 0
    assert hits > 10 and sched.num_preemptions > 0


def test_a_failed_requests_blocks_are_never_reused():
    """Non-finite logits make a request's KV suspect: its blocks lose their keys, so the next
    request with the same prompt recomputes rather than reusing them."""
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(1, 11))  # two full blocks and a tail
    failed = make_req("failed", tokens)
    commit(bm, failed, len(tokens))
    assert len(bm.cached_prefix(make_req("probe", tokens))) == 2
    bm.uncache(failed)
    bm.free(failed)
    check_pool(bm)
    assert bm.cached_prefix(make_req("again", tokens)) == []


def test_blocks_a_request_without_drafter_context_keyed_are_marked_until_evicted():
    """A request that decodes plain for life (no drafter context) keys its blocks for the
    target's reuse, but they are marked: a hit reports how many leading blocks also hold the
    drafter's context. Eviction clears the mark."""
    bm = BlockManager(6, BS)
    warm = make_req("warm", list(range(1, 9)))
    commit(bm, warm, 8)
    cold = make_req("cold", list(range(1, 13)))
    cold.draft_context = False
    admit(bm, cold)
    commit(bm, cold, 12)  # its own third block is keyed without drafter context
    later = make_req("later", list(range(1, 14)))
    hit = bm.cached_prefix(later)
    assert len(hit) == 3 and bm.draft_context_prefix(hit) == 2
    for r in (warm, cold):
        bm.free(r)
    filler = make_req("filler", [99] * 24)
    bm.allocate(filler, 24)  # takes every block: the cached ones are evicted
    assert bm.draft_context_prefix(list(range(6))) == 6
