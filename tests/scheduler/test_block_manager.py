"""BlockManager: free list, reference counts, rollback by length, fork of full blocks."""

import pytest

from scheduler.block_manager import BlockManager, cdiv
from scheduler.request import Request
from scheduler.sampling_params import SamplingParams

BS = 4


def make_req(req_id: str = "r", n_prompt: int = 1) -> Request:
    return Request(req_id, list(range(n_prompt)), SamplingParams())


def held_blocks(bm: BlockManager, *reqs: Request) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in reqs:
        for b in r.block_table:
            counts[b] = counts.get(b, 0) + 1
    return counts


def check_consistent(bm: BlockManager, *reqs: Request) -> None:
    """Ref counts equal the number of owners; free list is exactly the unowned blocks."""
    owners = held_blocks(bm, *reqs)
    free = list(bm._free)
    assert len(set(free)) == len(free), "a block is on the free list twice"
    assert set(free).isdisjoint(owners), "a held block is also on the free list"
    assert len(owners) + len(free) == bm.num_blocks
    for b in range(bm.num_blocks):
        assert bm.ref_count(b) == owners.get(b, 0)


def test_cdiv():
    assert cdiv(0, 4) == 0
    assert cdiv(1, 4) == 1
    assert cdiv(4, 4) == 1
    assert cdiv(5, 4) == 2
    assert cdiv(8, 4) == 2


def test_initial_state():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert bm.num_free_blocks == 8
    assert bm.usage == 0.0
    assert all(bm.ref_count(b) == 0 for b in range(8))


@pytest.mark.parametrize("nb, bs", [(0, 4), (4, 0), (-1, 4)])
def test_bad_construction(nb, bs):
    with pytest.raises(AssertionError):
        BlockManager(nb, bs)


@pytest.mark.parametrize(
    "num_tokens, expected_blocks",
    [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (16, 4), (17, 5)],
)
def test_allocate_block_boundaries(num_tokens, expected_blocks):
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = make_req()
    assert bm.num_blocks_needed(r, num_tokens) == expected_blocks
    assert bm.can_allocate(r, num_tokens)
    bm.allocate(r, num_tokens)
    assert len(r.block_table) == expected_blocks
    assert bm.num_free_blocks == 8 - expected_blocks
    assert bm.usage == pytest.approx(expected_blocks / 8)
    assert len(set(r.block_table)) == expected_blocks
    check_consistent(bm, r)


def test_allocate_then_free_returns_everything():
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = make_req()
    bm.allocate(r, 13)  # 4 blocks
    assert bm.num_free_blocks == 4
    assert bm.usage == pytest.approx(0.5)
    bm.free(r)
    assert r.block_table == []
    assert bm.num_free_blocks == 8
    assert bm.usage == 0.0
    check_consistent(bm, r)
    # freeing an empty table is a no-op
    bm.free(r)
    assert bm.num_free_blocks == 8


def test_double_allocate_grows_incrementally():
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = make_req()
    bm.allocate(r, 3)
    first = list(r.block_table)
    assert len(first) == 1
    # still inside the first block: nothing new
    assert bm.num_blocks_needed(r, 4) == 0
    bm.allocate(r, 4)
    assert r.block_table == first
    # crossing the boundary: exactly one more, the old prefix kept
    assert bm.num_blocks_needed(r, 5) == 1
    bm.allocate(r, 5)
    assert r.block_table[:1] == first and len(r.block_table) == 2
    bm.allocate(r, 16)
    assert r.block_table[:1] == first and len(r.block_table) == 4
    # asking for fewer tokens than already covered never shrinks or allocates
    assert bm.num_blocks_needed(r, 2) == 0
    bm.allocate(r, 2)
    assert len(r.block_table) == 4
    assert bm.num_free_blocks == 4
    check_consistent(bm, r)


def test_two_requests_get_disjoint_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_req("a"), make_req("b")
    bm.allocate(a, 9)
    bm.allocate(b, 12)
    assert set(a.block_table).isdisjoint(b.block_table)
    assert bm.num_free_blocks == 8 - 3 - 3
    check_consistent(bm, a, b)
    bm.free(a)
    assert bm.num_free_blocks == 5
    check_consistent(bm, a, b)
    bm.free(b)
    assert bm.num_free_blocks == 8
    check_consistent(bm, a, b)


def test_freed_blocks_are_reused():
    bm = BlockManager(num_blocks=2, block_size=BS)
    a, b = make_req("a"), make_req("b")
    bm.allocate(a, 8)
    assert bm.num_free_blocks == 0
    blocks = set(a.block_table)
    bm.free(a)
    bm.allocate(b, 8)
    assert set(b.block_table) == blocks
    check_consistent(bm, a, b)


def test_out_of_blocks_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a, b = make_req("a"), make_req("b")
    bm.allocate(a, 12)  # 3 blocks
    assert not bm.can_allocate(b, 5)  # needs 2, 1 free
    assert bm.can_allocate(b, 4)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(b, 5)
    assert b.block_table == []
    assert bm.num_free_blocks == 1
    check_consistent(bm, a, b)
    # growing the existing owner past the pool also fails atomically
    with pytest.raises(RuntimeError):
        bm.allocate(a, 20)
    assert len(a.block_table) == 3
    assert bm.num_free_blocks == 1
    check_consistent(bm, a, b)


def test_can_allocate_with_reserve():
    bm = BlockManager(num_blocks=4, block_size=BS)
    r = make_req()
    assert bm.can_allocate(r, 16)  # needs 4 of 4
    assert not bm.can_allocate(r, 16, reserve=1)
    assert bm.can_allocate(r, 12, reserve=1)
    assert not bm.can_allocate(r, 12, reserve=2)
    assert bm.can_allocate(r, 0, reserve=4)
    assert not bm.can_allocate(r, 0, reserve=5)


@pytest.mark.parametrize(
    "rollback_to, kept",
    [(16, 4), (13, 4), (12, 3), (9, 3), (8, 2), (5, 2), (4, 1), (1, 1), (0, 0)],
)
def test_rollback_by_length(rollback_to, kept):
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = make_req()
    bm.allocate(r, 16)
    table = list(r.block_table)
    bm.rollback(r, rollback_to)
    # rollback to the middle of a block keeps that partial block; the prefix is unchanged
    assert r.block_table == table[:kept]
    assert bm.num_free_blocks == 8 - kept
    assert bm.usage == pytest.approx(kept / 8)
    check_consistent(bm, r)


def test_rollback_beyond_table_is_noop():
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = make_req()
    bm.allocate(r, 6)
    bm.rollback(r, 100)
    assert len(r.block_table) == 2
    assert bm.num_free_blocks == 6


def test_rollback_then_regrow():
    bm = BlockManager(num_blocks=8, block_size=BS)
    r = make_req()
    bm.allocate(r, 10)  # 3 blocks
    bm.rollback(r, 5)   # 2 blocks: the partial second block is kept
    assert len(r.block_table) == 2
    bm.allocate(r, 8)   # fits in the kept blocks
    assert len(r.block_table) == 2
    bm.allocate(r, 9)
    assert len(r.block_table) == 3
    assert bm.num_free_blocks == 5
    check_consistent(bm, r)


def test_fork_shares_only_full_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    parent, child = make_req("p"), make_req("c")
    bm.allocate(parent, 10)  # blocks: [full, full, partial]
    free_before = bm.num_free_blocks
    bm.fork(parent, child, 10)
    assert child.block_table == parent.block_table[:2]
    assert child.block_table is not parent.block_table
    # fork allocates nothing
    assert bm.num_free_blocks == free_before
    assert bm.ref_count(parent.block_table[0]) == 2
    assert bm.ref_count(parent.block_table[1]) == 2
    assert bm.ref_count(parent.block_table[2]) == 1  # the partial block is not shared
    check_consistent(bm, parent, child)

    # the child grows with its own blocks
    bm.allocate(child, 10)
    assert child.block_table[:2] == parent.block_table[:2]
    assert child.block_table[2] != parent.block_table[2]
    assert bm.ref_count(child.block_table[2]) == 1
    check_consistent(bm, parent, child)


def test_fork_at_exact_block_boundary_and_zero():
    bm = BlockManager(num_blocks=8, block_size=BS)
    parent = make_req("p")
    bm.allocate(parent, 8)
    c1, c2, c3 = make_req("c1"), make_req("c2"), make_req("c3")
    bm.fork(parent, c1, 8)
    assert c1.block_table == parent.block_table
    bm.fork(parent, c2, 3)  # less than one full block: shares nothing
    assert c2.block_table == []
    bm.fork(parent, c3, 7)
    assert c3.block_table == parent.block_table[:1]
    assert bm.ref_count(parent.block_table[0]) == 3
    assert bm.ref_count(parent.block_table[1]) == 2
    check_consistent(bm, parent, c1, c2, c3)


def test_fork_into_nonempty_child_asserts():
    bm = BlockManager(num_blocks=8, block_size=BS)
    parent, child = make_req("p"), make_req("c")
    bm.allocate(parent, 8)
    bm.allocate(child, 1)
    with pytest.raises(AssertionError):
        bm.fork(parent, child, 8)


@pytest.mark.parametrize("parent_first", [True, False])
def test_fork_free_both_owners(parent_first):
    bm = BlockManager(num_blocks=8, block_size=BS)
    parent, child = make_req("p"), make_req("c")
    bm.allocate(parent, 10)   # 3 blocks
    bm.fork(parent, child, 10)  # shares 2
    bm.allocate(child, 12)    # child gets 1 own block
    assert bm.num_free_blocks == 8 - 4
    shared = parent.block_table[:2]

    first, second = (parent, child) if parent_first else (child, parent)
    bm.free(first)
    # shared blocks survive while the other owner holds them; only the first's private block returns
    assert bm.num_free_blocks == 8 - 3
    for b in shared:
        assert bm.ref_count(b) == 1
        assert b not in bm._free
    check_consistent(bm, parent, child)

    bm.free(second)
    assert bm.num_free_blocks == 8
    assert bm.usage == 0.0
    assert all(bm.ref_count(b) == 0 for b in range(8))
    check_consistent(bm, parent, child)


def test_fork_rollback_of_child_keeps_parent_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    parent, child = make_req("p"), make_req("c")
    bm.allocate(parent, 8)
    bm.fork(parent, child, 8)
    bm.rollback(child, 4)
    assert child.block_table == parent.block_table[:1]
    assert bm.ref_count(parent.block_table[1]) == 1
    assert bm.num_free_blocks == 6
    check_consistent(bm, parent, child)


def test_double_free_of_a_block_asserts():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a, b = make_req("a"), make_req("b")
    bm.allocate(a, 4)
    b.block_table = list(a.block_table)  # an illegal copy that bypasses fork
    bm.free(a)
    with pytest.raises(AssertionError, match="double free"):
        bm.free(b)
