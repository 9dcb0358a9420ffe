"""The context lookup's guess (runtime/context_lookup.py) against a direct search of the whole
sequence, on random sequences over a small vocabulary, as committed tokens grow and
unverified tails come and go."""

from __future__ import annotations

import random

import pytest
from adadecode.runtime.context_lookup import ContextLookup


def direct(history: list[int], min_len: int, max_len: int) -> int | None:
    """The token after the latest earlier occurrence of the longest suffix of ``min_len ..
    max_len`` tokens, found by scanning the whole sequence."""
    for k in range(min(max_len, len(history) - 1), min_len - 1, -1):
        for j in range(len(history) - 2, k - 2, -1):
            if history[j - k + 1 : j + 1] == history[-k:]:
                return history[j + 1]
    return None


@pytest.mark.parametrize("min_len,max_len", [(1, 4), (2, 4), (3, 3), (3, 6)])
def test_the_guess_is_the_continuation_of_the_latest_longest_match(min_len, max_len):
    rng = random.Random(min_len * 10 + max_len)
    guesses = 0
    for _ in range(300):
        lookup = ContextLookup(min_len, max_len)
        committed = [rng.randrange(4) for _ in range(rng.randrange(1, 6))]
        for _ in range(25):
            tail = [rng.randrange(4) for _ in range(rng.randrange(0, 4))]  # in flight; may be rolled back
            guess = lookup.guess(committed, tail)
            assert guess == direct(committed + tail, min_len, max_len), (committed, tail)
            guesses += guess is not None
            committed += [rng.randrange(4) for _ in range(rng.randrange(0, 3))]
    assert guesses > 1000  # the premise: most steps had a match to find


def test_no_match_no_guess():
    assert ContextLookup(1).guess([1, 2, 3]) is None
    assert ContextLookup(2).guess([1, 2, 3, 1]) is None  # "3 1" never occurred before
    assert ContextLookup(2).guess([1, 2, 3, 1], [2]) == 3  # "1 2" did, followed by 3


def test_a_match_shorter_than_one_token_is_refused():
    with pytest.raises(ValueError, match="at least 1 token"):
        ContextLookup(0)
