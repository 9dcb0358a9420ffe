"""Stop conditions: EOS, stop strings (across token boundaries), max_new_tokens."""

from __future__ import annotations

import pytest
from adadecode.runtime.stopping import StopCriteria, trim_at_stop_string

EOS = 0
PIECES = {0: "</s>", 1: "Hello", 2: ",", 3: " wor", 4: "ld", 5: "\n", 6: "\n\n", 7: "#", 8: "##", 9: " x"}


def decode(ids) -> str:
    """A fake tokenizer: every id is one fixed piece of text."""
    return "".join(PIECES[i] for i in ids)


def crit(max_new_tokens=100, eos=(EOS,), stop=(), decode_fn=decode) -> StopCriteria:
    return StopCriteria(max_new_tokens, frozenset(eos), tuple(stop), decode_fn if stop else None)


def first_stop(criteria: StopCriteria, tokens: list[int]) -> tuple[int, str] | None:
    """Feed ``tokens`` one at a time, as the Coordinator does; (how many, reason) at the first stop."""
    for n in range(1, len(tokens) + 1):
        reason = criteria.check(tokens[:n])
        if reason is not None:
            return n, reason
    return None


def test_nothing_generated_never_stops():
    assert crit(1, stop=("x",)).check([]) is None


def test_eos():
    c = crit()
    assert c.check([1, 2, 3]) is None
    assert c.check([1, 2, EOS]) == "eos"
    assert c.check([EOS]) == "eos"


def test_eos_only_counts_as_the_newest_token():
    assert crit().check([EOS, 1]) is None


def test_several_eos_ids():
    c = crit(eos=(EOS, 5))
    assert c.check([1, 5]) == "eos" and c.check([1, EOS]) == "eos" and c.check([1, 6]) is None


def test_no_eos_ids():
    assert crit(eos=()).check([EOS]) is None


def test_length():
    c = crit(3)
    assert c.check([1]) is None and c.check([1, 2]) is None
    assert c.check([1, 2, 3]) == "length"
    assert c.check([1, 2, 3, 4]) == "length"
    assert crit(1).check([7]) == "length"


@pytest.mark.parametrize(
    "stop, tokens, expected",
    [
        (["world"], [1, 3, 4, 2], (3, "stop")),  # " wor" + "ld"
        (["lo, w"], [1, 2, 3, 4], (3, "stop")),  # spans three tokens
        (["Hello"], [1, 2], (1, "stop")),  # one whole token
        (["ell"], [1], (1, "stop")),  # inside one token
        (["\n\n"], [1, 5, 5], (3, "stop")),  # two tokens make it
        (["\n\n"], [1, 6], (2, "stop")),  # one token holds it
        (["###"], [8, 9, 7, 8], (4, "stop")),  # "##" " x" "#" "##": only at the end
        (["zzz"], [1, 2, 3, 4], None),
        (["world", "Hel"], [1, 3, 4], (1, "stop")),  # the first to complete wins
        (["lo, world!"], [1, 2, 3, 4], None),  # longer than the text so far
    ],
)
def test_stop_strings(stop, tokens, expected):
    assert first_stop(crit(stop=stop), tokens) == expected


def test_stop_string_reaching_back_further_than_the_longest_string_in_tokens():
    # the window must reach back a whole string length before the newest token
    pieces = {10: "xab", 11: "cd", 12: "e", 13: "f"}
    c = StopCriteria(100, frozenset(), ("abcdef",), lambda ids: "".join(pieces[i] for i in ids))
    assert first_stop(c, [10, 11, 12, 13]) == (4, "stop")


@pytest.mark.parametrize(
    "eos, stop, max_new, tokens, reason",
    [
        ((EOS,), ("</s>",), 2, [1, EOS], "eos"),  # eos before stop string and length
        ((), ("ld",), 2, [3, 4], "stop"),  # stop string before length
        ((EOS,), ("ld",), 5, [3, 4], "stop"),
        ((EOS,), (), 2, [3, 4], "length"),
        ((EOS,), ("zz",), 2, [3, EOS], "eos"),
    ],
)
def test_precedence_eos_then_stop_string_then_length(eos, stop, max_new, tokens, reason):
    assert crit(max_new, eos=eos, stop=stop).check(tokens) == reason


@pytest.mark.parametrize("max_new", [0, -1])
def test_max_new_tokens_must_be_positive(max_new):
    with pytest.raises(ValueError, match=f"max_new_tokens must be >= 1, got {max_new}"):
        StopCriteria(max_new)


def test_stop_strings_need_a_decode_function():
    with pytest.raises(ValueError, match="decode function"):
        StopCriteria(4, frozenset(), ("###",))


def test_criteria_are_frozen():
    c = crit()
    with pytest.raises(AttributeError):
        c.max_new_tokens = 5




def _byte_decode(ids) -> str:
    """A byte-level tokenizer's decode: one id per byte, invalid UTF-8 shown as U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_stop_string_of_a_character_split_over_byte_tokens():
    c = StopCriteria(100, frozenset(), ("€",), _byte_decode)  # U+20AC is 3 bytes: 3 ids
    tokens = list("a€".encode())
    assert _byte_decode(tokens) == "a€"
    assert first_stop(c, tokens) == (len(tokens), "stop")


def test_stop_string_across_tokens_that_decode_to_nothing():
    pieces = {1: "a", 2: "", 3: "b"}  # 2: a special token, skipped when decoding
    c = StopCriteria(100, frozenset(), ("ab",), lambda ids: "".join(pieces[i] for i in ids))
    assert first_stop(c, [1, 2, 2, 3]) == (4, "stop")


# --- trim_at_stop_string ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("Hello world", ["world"], "Hello "),
        ("Hello world", ["zzz"], "Hello world"),
        ("Hello world", [], "Hello world"),
        ("a##b#c", ["#c", "##"], "a"),  # cut at the earliest stop string, whichever is listed first
        ("a##b#c", ["#"], "a"),
        ("stop here", ["stop"], ""),
        ("x\n\ny\n\n", ["\n\n"], "x"),
        ("", ["a"], ""),
    ],
)
def test_trim_at_stop_string(text, stop, expected):
    assert trim_at_stop_string(text, stop) == expected


def test_stop_string_with_the_bundled_tokenizer():
    from helpers import bundled_model_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    ids = tokenizer.encode("ok ✅ more", add_special_tokens=False)  # "✅" is 3 byte-level tokens

    def decode_fn(x):
        return tokenizer.decode(list(x), skip_special_tokens=True)

    c = StopCriteria(100, frozenset(), ("✅",), decode_fn)
    n, reason = first_stop(c, ids)
    assert reason == "stop" and "✅" in decode_fn(ids[:n]) and "✅" not in decode_fn(ids[: n - 1])
