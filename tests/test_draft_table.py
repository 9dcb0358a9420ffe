"""The draft table (runtime/draft_table.py): what it keeps, what it drafts, the file and its checks,
and drafts from it in the Coordinator. Output parity with its drafts on the bundled model is in
test_early_exit.py (test_lookup_drafts_match_plain_greedy)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from adadecode.runtime.context_lookup import ContextLookup
from adadecode.runtime.coordinator import Coordinator
from adadecode.runtime.draft_table import FORMAT, DraftTable, load_draft_table
from adadecode.runtime.events import DONE, WAITING, FinalPrediction, StepRequest
from adadecode.runtime.stopping import StopCriteria
from helpers import save_tiny_chat_model

META = {"base_model": {"fingerprint": "abc", "origin": "test", "vocab_size": 50}}


def brute_force(sequences, starts, history, max_len=4) -> tuple[set[int], int]:
    """The most frequent continuations (all of them, on a tie) of the longest suffix of ``history``
    seen before an answer token, and that suffix's length."""
    for k in range(min(max_len, len(history)), 0, -1):
        key = tuple(history[-k:])
        c = Counter(seq[j + 1] for seq, s in zip(sequences, starts)
                    for j in range(max(s - 1, 0), len(seq) - 1) if j + 1 >= k and tuple(seq[j - k + 1 : j + 1]) == key)
        if c:
            return {t for t, n in c.items() if n == max(c.values())}, k
    return set(), 0


def test_build_matches_brute_force():
    """Every guess is the most frequent continuation of the longest suffix seen: the n-grams left
    out (their shorter suffix gives the same token) never change one."""
    rng = random.Random(0)
    seqs = [[rng.randrange(6) for _ in range(rng.randrange(5, 40))] for _ in range(30)]
    starts = [rng.randrange(0, len(s) // 2) for s in seqs]
    table = DraftTable.build(seqs, starts=starts)
    assert len(table) < len({tuple(s[j - k + 1 : j + 1]) for s in seqs for j in range(len(s)) for k in range(1, 5)})
    guessed = 0
    for _ in range(2000):
        history = [rng.randrange(7) for _ in range(rng.randrange(1, 8))]  # 6: never seen
        want, _ = brute_force(seqs, starts, history)
        got, _ = table.match(history)
        assert (got in want) if want else got is None, (history, got, want)
        guessed += got is not None
    assert guessed > 1000


def test_only_what_an_answer_says():
    """A prompt's own n-grams are kept only where an answer token follows them."""
    table = DraftTable.build([[1, 2, 3, 9, 8]], starts=[3])
    assert table.match([2, 3])[0] == 9  # 3 -> 9: the first answer token follows it
    assert table.match([1])[0] is None and table.match([2])[0] is None  # 1 -> 2, 2 -> 3: the prompt's own
    assert table.match([9]) == (8, 1)


def test_save_load_round_trip(tmp_path):
    table = DraftTable.build([[1, 2, 3, 4, 1, 2, 5]], meta=META)
    path = table.save(tmp_path / "t.safetensors")
    back = load_draft_table(path, fingerprint="abc", vocab_size=50)
    assert back.entries == table.entries and back.max_len == table.max_len
    assert back.meta["base_model"] == META["base_model"]


def test_load_refuses_what_does_not_fit(tmp_path):
    path = DraftTable.build([[1, 2, 3, 4]], meta=META).save(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match=r"for another model.*build-draft-table --model SOURCE.*draft_table=none"):
        load_draft_table(path, fingerprint="other", vocab_size=50)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 3"):
        load_draft_table(path, fingerprint="abc", vocab_size=3)
    with pytest.raises(ValueError, match="does not exist"):
        load_draft_table(tmp_path / "none.safetensors", fingerprint="abc", vocab_size=50)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(ValueError, match=f"not a draft table of format {FORMAT}"):
        load_draft_table(tmp_path / "other.safetensors", fingerprint="abc", vocab_size=50)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot be read"):
        load_draft_table(tmp_path / "cut.safetensors", fingerprint="abc", vocab_size=50)


def test_context_first_then_table():
    table = DraftTable.build([[7, 8, 9]])
    lookup = ContextLookup(1, table=table)
    assert lookup.match([7]) == (8, 1)  # no earlier 7 in the sequence: the table
    assert lookup.match([7, 5, 7]) == (5, 1)  # the sequence's own continuation wins
    assert ContextLookup(1).match([7]) == (None, 0)


def decode(coord: Coordinator, seq: int, truth: list[int]) -> list[StepRequest]:
    """Run ``coord``'s sequence against a final layer that says ``truth`` (output token by token);
    the requests it sent."""
    sent, n = [], coord.sequences[seq].prompt_len
    while (action := coord.next_action()) not in (DONE, WAITING):
        if isinstance(action, StepRequest):
            sent.append(action)
            first = action.pos + len(action.tokens) - action.drafts  # the positions it predicts
            for pos in range(first, action.pos + len(action.tokens) + 1):
                if pos - n < len(truth):
                    coord.receive(FinalPrediction(seq, action.epoch, pos, truth[pos - n]))
    assert action is DONE
    return sent


def test_coordinator_drafts_from_the_table():
    """Where the sequence has no match, the table drafts; its drafts are verified like any other."""
    answer = [10, 11, 12, 13, 14, 15]
    table = DraftTable.build([[1, 10, 11, 12, 13, 14, 15]], starts=[1])
    for tbl, want_drafted in ((None, 0), (table, 1)):
        coord = Coordinator(max_inflight=2, lookup=3, draft=3, table=tbl)
        coord.add_sequence(0, [1, 2], StopCriteria(max_new_tokens=len(answer)), early_exit="eager")
        sent = decode(coord, 0, answer)
        s = coord.sequences[0]
        assert s.generated == answer
        assert (s.stats.drafted > 0) == bool(want_drafted)
        if tbl is not None:
            assert len(sent) < len(answer)  # right drafts: fewer passes than tokens
            assert s.stats.lookup_accepted == s.stats.drafted  # the table is this very answer


def test_build_on_a_tiny_model(tmp_path):
    """`build-draft-table`: the model's greedy answers (a text prompt raw and through the chat
    template), the validation prompts left out; the file loads for that model."""
    from adadecode.launcher.draft_table import main
    from adadecode.runtime.model_source import resolve_model

    model_dir = save_tiny_chat_model(tmp_path / "model")

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"abc {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "t.safetensors"
    assert main(["--model", str(model_dir), "--prompts", str(prompts), "--val-every", "3",
                 "--max-new-tokens", "5", "--out", str(out), "--no-progress"]) == 0
    resolved = resolve_model(str(model_dir))
    table = load_draft_table(out, fingerprint=resolved.fingerprint, vocab_size=table_vocab(model_dir))
    built = table.meta["built_from"]
    assert built["sequences"] == 8 and 0 < built["answer_tokens"] <= 40 and len(table) > 0
    assert main(["--model", str(model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "t.bin")]) == 2


def table_vocab(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_loaded_where_drafts_run():
    """The bundled table is loaded on the Coordinator's rank where drafts run (auto), and nowhere else."""
    from adadecode.runtime.engine import load_rank
    from adadecode.runtime.loading import LoadSpec
    from helpers import bundled_model_dir

    bundled_model_dir()
    spec = LoadSpec("bundled:smollm2-135m-instruct", stages=2, heads=None, compile="off", draft=3)
    assert len(load_rank(spec, rank=0)[3].table) > 10_000
    assert load_rank(spec, rank=1)[3].table is None  # not the Coordinator's rank
    assert load_rank(spec.replace(draft=-1), rank=0)[3].table is None  # auto: no drafts on the eager CPU path
    assert load_rank(spec.replace(draft_table=None), rank=0)[3].table is None
    with pytest.raises(ValueError, match="does not exist"):
        load_rank(spec.replace(draft_table="/nonexistent/t.safetensors"), rank=0)
