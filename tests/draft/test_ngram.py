from draft import DraftInput, NgramDrafter


def propose(tokens: list[int], k: int = 3, **kw) -> list[int]:
    return NgramDrafter(k, **kw).propose([DraftInput("r", tokens, len(tokens) - 1)])[0].draft_token_ids


def test_longest_match_first_and_most_recent():
    # suffix [1, 2, 3] occurs at 0 (followed by 9) and 5 (followed by 7): longest n first,
    # most recent occurrence
    assert propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 1, 2, 3]) == [7, 7, 1]
    # only the 1-gram [5] matches
    assert propose([5, 8, 6, 5]) == [8, 6, 5]


def test_no_match_and_short_follow():
    assert propose([1, 2, 3, 4]) == []
    assert propose([4, 1, 4]) == [1, 4]  # fewer than k tokens follow the match
    assert propose([7]) == []


def test_max_n_and_min_n():
    tokens = [1, 2, 3, 4, 2, 3, 4]
    assert propose(tokens, k=2, min_n=3, max_n=3) == [2, 3]
    assert propose([1, 2, 1, 3, 9, 3], k=2, min_n=2, max_n=4) == []  # [9, 3] never seen before
