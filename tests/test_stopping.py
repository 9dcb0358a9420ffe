"""Stop conditions: EOS, stop strings (across token boundaries), max_new_tokens; and the
incremental detokenisation behind stop strings and streaming (runtime/detokenize.py), which
must give the text a whole decode gives while decoding each token about once."""

from __future__ import annotations

import random

import pytest
from adadecode.runtime.detokenize import IncrementalDetokenizer, TextStream
from adadecode.runtime.stopping import StopCriteria, trim_at_stop_string

EOS = 0
PIECES = {0: "</s>", 1: "Hello", 2: ",", 3: " wor", 4: "ld", 5: "\n", 6: "\n\n", 7: "#", 8: "##", 9: " x"}


def decode(ids) -> str:
    """A fake tokenizer: every id is one fixed piece of text."""
    return "".join(PIECES[i] for i in ids)


def crit(max_new_tokens=100, eos=(EOS,), stop=(), decode_fn=decode) -> StopCriteria:
    return StopCriteria(max_new_tokens, frozenset(eos), tuple(stop), decode_fn if stop else None)


def first_stop(criteria: StopCriteria, tokens: list[int]) -> tuple[int, str] | None:
    """Feed ``tokens`` one at a time to one checker, as the Coordinator does; (how many, reason) at
    the first stop. The one-shot ``check`` of each prefix must agree."""
    checker, first = criteria.checker(), None
    for n in range(1, len(tokens) + 1):
        reason = checker.push(tokens[n - 1 : n])
        if first is None and criteria.check(tokens[:n]) is not None:
            first = n, criteria.check(tokens[:n])
        if reason is not None:
            assert (n, reason) == first
            return n, reason
    assert first is None
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


# --- ignore_eos and min_new_tokens (vLLM's ignore_eos, min_tokens) ------------------------------


def test_ignore_eos_makes_eos_an_ordinary_token():
    c = StopCriteria(4, frozenset({EOS}), ignore_eos=True)
    assert first_stop(c, [EOS, 1, EOS, EOS, EOS]) == (4, "length")
    c = StopCriteria(9, frozenset({EOS}), ("ld",), decode, ignore_eos=True)
    assert first_stop(c, [EOS, 3, EOS, 4]) == (4, "stop")  # stop strings still stop


def test_eos_before_min_new_tokens_is_an_ordinary_token():
    c = StopCriteria(9, frozenset({EOS}), min_new_tokens=3)
    assert first_stop(c, [EOS, EOS, 1, EOS]) == (4, "eos")
    assert first_stop(c, [1, EOS, EOS]) == (3, "eos")  # at min_new_tokens: it stops
    assert first_stop(StopCriteria(3, frozenset({EOS}), min_new_tokens=3), [EOS, EOS, 1]) == (3, "length")


@pytest.mark.parametrize(
    "stop, min_new, tokens, expected",
    [
        (["Hello"], 2, [1, 2, 3, 4], None),  # completed by the first token: ordinary text
        (["Hello"], 1, [1, 2], (1, "stop")),
        (["o,"], 2, [1, 2, 3], (2, "stop")),  # completed by the min_new_tokens-th token: it stops
        (["lo, w"], 2, [1, 2, 3], (3, "stop")),  # begins before, ends after
        (["Hello"], 2, [1, 2, 1], (3, "stop")),  # a later one stops
        # a short stop string before min_new_tokens stays in the checker's window (kept for the
        # long one) for several tokens, and is never taken for a new one
        (["ll", "zzzzzzzzzz"], 2, [1, 2, 9, 9, 9], None),
    ],
)
def test_stop_strings_before_min_new_tokens_are_ordinary_text(stop, min_new, tokens, expected):
    assert first_stop(crit(stop=stop) if min_new == 0 else StopCriteria(
        100, frozenset({EOS}), tuple(stop), decode, min_new_tokens=min_new), tokens) == expected


def test_min_new_tokens_is_at_most_max_new_tokens():
    with pytest.raises(ValueError, match=r"min_new_tokens must be in \[0, max_new_tokens = 3\], got 4"):
        StopCriteria(3, min_new_tokens=4)


def _stops_by_definition(tokens, eos, stop, max_new, min_new, ignore_eos):
    """The first stop and the output text, by the rule itself on whole decodes: a stop string
    counts when it ends past the text of the first min_new - 1 tokens."""
    boundary = len(decode(tokens[: max(0, min_new - 1)]))

    def cut(text):
        found = [i for s in stop for i in range(len(text)) if text.startswith(s, i) and i + len(s) > boundary]
        return min(found, default=-1)

    for n in range(1, len(tokens) + 1):
        text = decode(tokens[:n])
        reason = None
        if n >= min_new and not ignore_eos and tokens[n - 1] in eos:
            reason = "eos"
        elif n >= min_new and cut(text) >= 0:
            reason = "stop"
        elif n >= max_new:
            reason = "length"
        if reason:
            return (n, reason), text if cut(text) < 0 else text[: cut(text)]
    return None, None


@pytest.mark.parametrize("seed", range(200))
def test_the_checker_and_the_stream_follow_min_new_tokens_and_ignore_eos(seed):
    """Random tokens, stop strings, min_new_tokens and ignore_eos: the checker stops where the
    rule says, and the streamed text is the output the rule gives (stop strings before
    min_new_tokens kept), whatever the streaming steps."""
    rng = random.Random(seed)
    tokens = [rng.randrange(len(PIECES)) for _ in range(12)]
    stop = tuple(rng.sample(["Hello", "ll", "o,", ",", "ld", "\n", "#", "##", " x", "wor", "Hello, world"],
                            rng.randint(0, 3)))
    max_new = rng.randint(1, 12)
    min_new, ignore_eos = rng.randint(0, max_new), rng.random() < 0.5
    c = StopCriteria(max_new, frozenset({EOS}), stop, decode if stop else None, min_new, ignore_eos)
    expected, text = _stops_by_definition(tokens, {EOS}, stop, max_new, min_new, ignore_eos)
    assert first_stop(c, tokens) == expected, (tokens, stop, min_new)
    if expected is not None:
        out = tokens[: expected[0]]
        chunks: list[str] = []
        s = TextStream(decode, stop, chunks.append, min_tokens=min_new)
        i = 0
        while i < len(out):
            step = rng.randint(1, 4)
            s.push(out[i : i + step])
            i += step
        s.flush()
        assert "".join(chunks) == text, (tokens, stop, min_new)




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


# --- incremental detokenisation ----------------------------------------------------------------

# A byte-level tokenizer (GPT-2, Llama 3, Qwen, SmolLM): ids 0..255 are bytes, 256 a special
# token that decodes to nothing, 257.. two-byte pieces.
PAIRS = {257: b"\xc3\xa9", 258: b"\xe2\x82", 259: b" w", 260: b"\xac!"}


def byte_decode(ids) -> str:
    raw = b"".join(PAIRS[i] if i in PAIRS else b"" if i == 256 else bytes([i]) for i in ids)
    return raw.decode("utf-8", errors="replace")


def sentencepiece_decode(ids) -> str:
    """SentencePiece-like: pieces carry their leading space, which a decode drops at its start."""
    words = {0: " Hello", 1: " world", 2: ",", 3: " a", 4: "b", 5: ""}
    return "".join(words[i] for i in ids).removeprefix(" ")


def pieces(detok: IncrementalDetokenizer, ids, step: int = 1) -> list[str]:
    out = [detok.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    return [*out, detok.flush()]


@pytest.mark.parametrize("step", [1, 2, 5])
@pytest.mark.parametrize("seed", range(4))
def test_incremental_text_is_the_whole_decode(seed, step):
    rng = random.Random(seed)
    text = "héllo wörld, €5 ✅ ok 日本 " * 3
    ids = list(text.encode())
    for _ in range(10):  # special tokens and multi-byte pieces sprinkled in
        ids.insert(rng.randrange(len(ids)), rng.choice([256, 257, 259]))
    ids += [258, 260]  # "€!" from two pieces: a character split across tokens
    out = pieces(IncrementalDetokenizer(byte_decode), ids, step)
    assert "".join(out) == byte_decode(ids)
    assert not any(p.endswith("\ufffd") for p in out[:-1])  # incomplete characters are held back


def test_incremental_text_keeps_sentencepiece_spaces():
    ids = [0, 1, 2, 5, 3, 4, 0]
    assert "".join(pieces(IncrementalDetokenizer(sentencepiece_decode), ids)) == sentencepiece_decode(ids)


def test_pending_shows_text_held_back_for_an_incomplete_character():
    detok = IncrementalDetokenizer(byte_decode)
    assert detok.push(list(b"END")) == "END"
    assert detok.push([0xE2]) == "" and detok.pending == "\ufffd"  # first byte of "€"
    assert detok.push([0x82, 0xAC]) == "€" and detok.pending == ""
    assert detok.push([0xE2]) == "" and detok.flush() == "\ufffd"  # the end of the output: as decoded


def test_incremental_decoding_work_does_not_grow_with_the_output():
    decoded = []

    def decode(ids):
        decoded.append(len(ids))
        return byte_decode(ids)

    n = 2000
    detok = IncrementalDetokenizer(decode)
    for i in range(n):
        detok.push([97 + i % 26])
    assert max(decoded) <= 2 and sum(decoded) <= 3 * n


def test_stop_string_right_before_an_incomplete_character_stops_at_once():
    c = StopCriteria(100, frozenset(), ("END",), byte_decode)
    assert first_stop(c, [*b"xEND", 0xE2, 0x82, 0xAC]) == (4, "stop")
    tokens = [*b"xEN", 258, *b"D"]
    assert first_stop(StopCriteria(100, frozenset(), ("ND",), byte_decode), tokens) is None  # "N\ufffdD"


def test_incremental_stop_strings_with_the_bundled_tokenizer():
    from helpers import bundled_model_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_dir()))

    def decode_fn(x):
        return tokenizer.decode(list(x), skip_special_tokens=True)

    text = "Hello, world! ✅ Größe: 日本語 — done.\n\nNext: `code` here"
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids[5:5] = [tokenizer.eos_token_id]  # a special token in the middle: decodes to nothing
    for step in (1, 3):
        assert "".join(pieces(IncrementalDetokenizer(decode_fn), ids, step)) == decode_fn(ids)
    for stop in ("\n\n", "日本", "✅", "done."):
        n, reason = first_stop(StopCriteria(200, frozenset(), (stop,), decode_fn), ids)
        assert reason == "stop" and stop in decode_fn(ids[:n]) and stop not in decode_fn(ids[: n - 1])


# --- streaming ---------------------------------------------------------------------------------


def stream(ids, stop=(), step=1, decode=byte_decode) -> list[str]:
    chunks = []
    s = TextStream(decode, stop, chunks.append)
    for i in range(0, len(ids), step):
        s.push(ids[i : i + step])
    s.flush()
    return chunks


@pytest.mark.parametrize(
    "text, stop",
    [
        ("Hello world, €5", ()),
        ("Hello world. END and more", ("END",)),
        ("abcabd", ("abd", "bca")),  # the first to start wins: "bca" at 1
        ("a€b", ("€",)),  # a stop string of a multi-byte character
        ("no stop here", ("zzz",)),
        ("x\n\ny\n\n", ("\n\n",)),
    ],
)
@pytest.mark.parametrize("step", [1, 3])
def test_streamed_text_is_the_trimmed_text(text, stop, step):
    ids = list(text.encode())
    chunks = stream(ids, stop, step)
    assert "".join(chunks) == trim_at_stop_string(byte_decode(ids), stop)
    assert all(chunks)  # no empty chunks


def test_streaming_holds_back_only_what_may_start_a_stop_string():
    chunks = []
    s = TextStream(byte_decode, ("STOP",), chunks.append)
    s.push(list(b"abcdefS"))
    assert "".join(chunks) == "abcd"  # the last len("STOP") - 1 characters may begin a stop string
    s.push(list(b"T"))
    s.push(list(b"x"))  # "STx": not a stop string after all
    s.push(list(b"STOP and more"))
    s.flush()
    assert "".join(chunks) == "abcdefSTx"


def test_nothing_is_decoded_without_a_listener():
    calls = []
    s = TextStream(lambda ids: calls.append(ids) or "", (), None)
    s.push([1, 2])
    s.flush()
    assert calls == []

