"""The Stage's backfill scheduler, rule by rule, over the fake model and scripted heads.

h11-style: build a Stage, push events with ``receive``, pull with ``next_action``, and
assert on the events it hands out, on the fake model's recorded ``run_layers`` calls
``(slot, pos, first_layer, last_layer, rows)``, on the heads it evaluated and on its state.
The model has 6 layers; a head is confident exactly where a test's ``exits`` says.
"""

from __future__ import annotations

import pytest
import torch
from adadecode.runtime.events import (
    DONE,
    WAITING,
    Activations,
    EarlyPrediction,
    FinalPrediction,
    ProtocolError,
    Rollback,
    SequenceFinished,
    Shutdown,
    StepRequest,
    Verified,
)
from adadecode.runtime.stage import Stage, StageState
from fakes import FakeStageModel, scripted_heads

L = 6
PROMPT = (5, 17, 3)
P = len(PROMPT)
TOKEN = 9  # what a confident head predicts
TOKENS = PROMPT + (7, 8, 7, 8)  # what stage 0 is given at each position


def make_stage(start=0, end=L, head_layers=(), exits=None, policy="deferred", num_slots=1, max_batch=1) -> Stage:
    """A stage of ``[start, end)``: stage 0 when it starts at 0, the last when it ends at L.
    One item per call unless ``max_batch`` says otherwise (the batching rules are tested last)."""
    index = 0 if start == 0 else 1
    heads = scripted_heads(head_layers, {} if exits is None else exits)
    model = FakeStageModel(start, end, L, num_slots)
    return Stage(index, index + (1 if end == L else 2), model, heads, policy, max_batch=max_batch)


def item(stage: Stage, pos: int, n: int = 1, seq: int = 0, epoch: int = 0, emitted=False, predict_from=-1):
    """Positions ``pos .. pos+n-1`` as a stage takes them: tokens on stage 0, activations elsewhere."""
    if stage.is_first:
        return StepRequest(seq, epoch, pos, TOKENS[pos : pos + n])
    hidden = torch.tensor([[pos + i, 1000 + pos + i] for i in range(n)])
    return Activations(seq, epoch, pos, stage.start, hidden, predict_from, emitted)


def summary(event):
    """An output as a comparable tuple (hidden states and final tokens are the fake's hashes)."""
    if isinstance(event, Activations):
        return ("acts", event.seq, event.epoch, event.pos, event.hidden.shape[0], event.predict_from, event.emitted)
    if isinstance(event, FinalPrediction):
        return ("final", event.seq, event.epoch, event.pos)
    if isinstance(event, EarlyPrediction):
        return ("early", event.seq, event.epoch, event.pos, event.token, event.layer)
    return event


def pull(stage: Stage):
    return summary(stage.next_action())


def drain(stage: Stage) -> list:
    out = []
    while (action := stage.next_action()) is not WAITING and action is not DONE:
        out.append(summary(action))
    return out


def prefill(stage: Stage, seq: int = 0, n: int = P) -> None:
    """Run an ``n``-token prompt through (no head may be confident on it), then forget the records."""
    stage.receive(item(stage, 0, n, seq=seq))
    assert len(drain(stage)) == 1
    stage.model.calls.clear()
    stage.model.lm_head_rows.clear()
    stage.heads.calls.clear()


def lengths(stage: Stage, slot: int = 0) -> list[int]:
    return [stage.model.cache_length(layer, slot) for layer in range(stage.start, stage.end)]


def out_of(stage: Stage, pos: int, n: int = 1, seq: int = 0, epoch: int = 0, predict_from=None, emitted=False):
    """What ``stage`` hands on for ``pos .. pos+n-1``: activations, or the finals of the last stage."""
    first = pos + n - 1 if predict_from is None else predict_from
    if not stage.is_last:
        return [("acts", seq, epoch, pos, n, first, emitted)]
    return [("final", seq, epoch, p + 1) for p in range(first, pos + n)]


# --- where heads are evaluated, and where they split a stage's run ---------------------------


@pytest.mark.parametrize(
    "start, end, head_layers, policy, runs, evaluated",
    [
        # policy off: heads are never evaluated and the stage's layers run as one call
        (0, 6, (2, 4), "off", [(0, 6)], []),
        (0, 6, (2, 4), "eager", [(0, 2), (2, 4), (4, 6)], [2, 4]),
        (0, 6, (2, 4), "deferred", [(0, 2), (2, 4), (4, 6)], [2, 4]),
        # a head at a stage's first layer is the previous stage's; none after the final layer
        (0, 6, (0, 6), "eager", [(0, 6)], []),
        # a middle stage evaluates the head at its end on its output
        (2, 4, (1, 2, 3, 4, 5), "eager", [(2, 3), (3, 4)], [3, 4]),
        (4, 6, (3, 4, 5, 6), "deferred", [(4, 5), (5, 6)], [5]),
        (0, 3, (3,), "deferred", [(0, 3)], [3]),
    ],
)
def test_heads_in_range_split_the_run_and_see_only_the_last_position(start, end, head_layers, policy, runs, evaluated):
    stage = make_stage(start, end, head_layers, policy=policy)
    stage.receive(item(stage, 0, P))
    assert drain(stage) == out_of(stage, 0, P)
    assert stage.model.calls == [(0, 0, a, b, P) for a, b in runs]
    assert stage.heads.calls == [(layer, P - 1) for layer in evaluated]
    assert stage.stats.head_evals == len(evaluated)
    assert lengths(stage) == [P] * (end - start)


# --- a confident head ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, start, end, head_layers, exit_layer, ran, backfill, idle_backfills",
    [
        # eager: the remaining layers run next, in the same chunk, without the heads above
        ("eager", 0, 6, (2, 4), 2, [(0, 2)], [(2, 4), (4, 6)], 0),
        # deferred with nothing else to do: the same backfill, as an idle backfill
        ("deferred", 0, 6, (2, 4), 2, [(0, 2)], [(2, 4), (4, 6)], 1),
        ("eager", 0, 6, (2, 4), 4, [(0, 2), (2, 4)], [(4, 6)], 0),
        ("deferred", 0, 6, (2, 4), 4, [(0, 2), (2, 4)], [(4, 6)], 1),
        ("eager", 2, 6, (4,), 4, [(2, 4)], [(4, 6)], 0),
        ("deferred", 2, 6, (4,), 4, [(2, 4)], [(4, 6)], 1),
        # a head at the stage's end: nothing left to backfill, the activations go on at once
        ("eager", 0, 3, (3,), 3, [(0, 3)], [], 0),
        ("deferred", 0, 3, (3,), 3, [(0, 3)], [], 0),
    ],
)
def test_a_confident_head_emits_at_once_and_the_rest_runs_later(
    policy, start, end, head_layers, exit_layer, ran, backfill, idle_backfills
):
    stage = make_stage(start, end, head_layers, {(exit_layer, P): TOKEN}, policy)
    prefill(stage)
    stage.receive(item(stage, P))
    assert pull(stage) == ("early", 0, 0, P + 1, TOKEN, exit_layer)
    assert stage.model.calls == [(0, P, a, b, 1) for a, b in ran]  # nothing above the exit yet
    assert lengths(stage) == [P + 1 if layer < exit_layer else P for layer in range(start, end)]
    assert drain(stage) == out_of(stage, P, emitted=True)
    assert stage.model.calls == [(0, P, a, b, 1) for a, b in ran + backfill]
    assert stage.heads.calls == [(l, P) for l in head_layers if start < l <= exit_layer]  # none after the exit
    assert lengths(stage) == [P + 1] * (end - start)
    assert stage.stats.early_exits == {exit_layer: 1}
    assert (stage.stats.idle_backfills, stage.stats.merged) == (idle_backfills, 0)


@pytest.mark.parametrize("late", [False, True], ids=["queued-before-the-exit", "queued-after-the-exit"])
@pytest.mark.parametrize(
    "policy, calls, outputs",
    [
        # eager: the backfill runs next, before anything queued
        (
            "eager",
            [(0, P, 0, 2, 1), (0, P, 2, 6, 1), (1, P + 1, 0, 2, 1), (1, P + 1, 2, 6, 1)],
            [("final", 0, 0, P + 1), ("final", 1, 0, P + 2)],
        ),
        # deferred: fresh work first, the parked backfill when the stage would idle
        (
            "deferred",
            [(0, P, 0, 2, 1), (1, P + 1, 0, 2, 1), (1, P + 1, 2, 6, 1), (0, P, 2, 6, 1)],
            [("final", 1, 0, P + 2), ("final", 0, 0, P + 1)],
        ),
    ],
)
def test_eager_backfill_goes_first_deferred_waits_for_fresh_work(policy, calls, outputs, late):
    exits = {}
    stage = make_stage(0, 6, (2,), exits, policy, num_slots=2)
    prefill(stage, seq=0)
    prefill(stage, seq=1, n=P + 1)  # its token goes at P + 1, where no head is confident
    exits[(2, P)] = TOKEN
    stage.receive(item(stage, P, seq=0))
    if not late:
        stage.receive(item(stage, P + 1, seq=1))
    assert pull(stage) == ("early", 0, 0, P + 1, TOKEN, 2)
    if late:
        stage.receive(item(stage, P + 1, seq=1))
    assert drain(stage) == outputs
    assert stage.model.calls == calls
    assert stage.stats.idle_backfills == (policy == "deferred")


# --- deferred: merging a parked backfill with the next token ------------------------------------


@pytest.mark.parametrize(
    "start, end, head",
    [(0, 6, 2), (0, 4, 2), (2, 6, 4)],
    ids=["single-stage", "first-stage", "last-stage"],
)
def test_a_parked_backfill_joins_the_next_token_as_one_chunk(start, end, head):
    stage = make_stage(start, end, (head,), {(head, P): TOKEN}, "deferred")
    prefill(stage)
    stage.receive(item(stage, P))
    assert pull(stage) == ("early", 0, 0, P + 1, TOKEN, head)
    stage.receive(item(stage, P + 1))  # the early token, started by the coordinator
    # the new token runs up to the parked layer alone, then both positions as one chunk
    assert drain(stage) == out_of(stage, P, 2, predict_from=P)
    assert stage.model.calls == [(0, P, start, head, 1), (0, P + 1, start, head, 1), (0, P, head, end, 2)]
    assert stage.heads.calls == [(head, P), (head, P + 1)]  # the merged chunk's new last row
    assert (stage.stats.merged, stage.stats.idle_backfills) == (1, 0)
    assert stage.model.lm_head_rows == ([2] if stage.is_last else [])
    assert lengths(stage) == [P + 2] * (end - start)


def test_a_merged_chunk_can_exit_again_and_take_a_third_token():
    stage = make_stage(0, 6, (2,), {(2, P): TOKEN, (2, P + 1): TOKEN + 1}, "deferred")
    prefill(stage)
    stage.receive(item(stage, P))
    assert pull(stage) == ("early", 0, 0, P + 1, TOKEN, 2)
    stage.receive(item(stage, P + 1))
    assert pull(stage) == ("early", 0, 0, P + 2, TOKEN + 1, 2)  # parked again, now two positions
    assert lengths(stage) == [P + 2, P + 2, P, P, P, P]
    stage.receive(item(stage, P + 2))
    assert drain(stage) == [("final", 0, 0, P + 1), ("final", 0, 0, P + 2), ("final", 0, 0, P + 3)]
    assert stage.model.calls == [(0, P, 0, 2, 1), (0, P + 1, 0, 2, 1), (0, P + 2, 0, 2, 1), (0, P, 2, 6, 3)]
    assert stage.stats.merged == 2


def test_a_prompt_parked_by_a_head_joins_the_first_token():
    stage = make_stage(0, 6, (2,), {(2, P - 1): TOKEN}, "deferred")
    stage.receive(item(stage, 0, P))
    assert pull(stage) == ("early", 0, 0, P, TOKEN, 2)
    stage.receive(item(stage, P))
    # both the prompt's last position and the token need their next token
    assert drain(stage) == [("final", 0, 0, P), ("final", 0, 0, P + 1)]
    assert stage.model.calls == [(0, 0, 0, 2, P), (0, P, 0, 2, 1), (0, 0, 2, 6, P + 1)]
    assert stage.model.lm_head_rows == [2]


# --- deferred: idle backfill ---------------------------------------------------------------------


def test_idle_backfill_starts_at_the_lowest_layer_and_picks_up_the_parked_items_above():
    # token P parks at 4; token P+1 exits earlier, at 2, below it
    stage = make_stage(0, 6, (2, 4), {(4, P): TOKEN, (2, P + 1): TOKEN + 1}, "deferred")
    prefill(stage)
    stage.receive(item(stage, P))
    assert pull(stage) == ("early", 0, 0, P + 1, TOKEN, 4)
    stage.receive(item(stage, P + 1))
    assert pull(stage) == ("early", 0, 0, P + 2, TOKEN + 1, 2)
    assert lengths(stage) == [P + 2, P + 2, P + 1, P + 1, P, P]
    assert drain(stage) == [("final", 0, 0, P + 1), ("final", 0, 0, P + 2)]
    assert stage.model.calls == [
        (0, P, 0, 2, 1), (0, P, 2, 4, 1),  # token P, parked at 4
        (0, P + 1, 0, 2, 1),  # token P+1, parked at 2
        (0, P + 1, 2, 4, 1), (0, P, 4, 6, 2),  # idle: from 2, joined by token P at 4
    ]
    assert stage.heads.calls == [(2, P), (4, P), (2, P + 1)]  # not again on P+1 at 4: already emitted
    assert (stage.stats.idle_backfills, stage.stats.merged) == (1, 1)


def test_idle_backfill_serves_the_lowest_sequence_first():
    exits = {}
    stage = make_stage(0, 6, (2, 4), exits, "deferred", num_slots=2)
    prefill(stage, seq=1)  # slot 0
    prefill(stage, seq=0, n=P + 1)  # slot 1
    exits.update({(2, P): TOKEN, (4, P + 1): TOKEN})
    stage.receive(item(stage, P, seq=1))  # exits at 2
    stage.receive(item(stage, P + 1, seq=0))  # exits at 4
    assert drain(stage) == [
        ("early", 1, 0, P + 1, TOKEN, 2),
        ("early", 0, 0, P + 2, TOKEN, 4),
        ("final", 0, 0, P + 2),  # sequence 0 first, though it parked later and higher
        ("final", 1, 0, P + 1),
    ]
    assert stage.model.calls == [
        (0, P, 0, 2, 1),
        (1, P + 1, 0, 2, 1), (1, P + 1, 2, 4, 1),
        (1, P + 1, 4, 6, 1),  # idle: sequence 0
        (0, P, 2, 4, 1), (0, P, 4, 6, 1),  # idle: sequence 1
    ]
    assert stage.stats.idle_backfills == 2


# --- the emitted flag ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "start, end, exits, emitted, evaluated, outputs",
    [
        # a later stage does not evaluate a head on a position whose next token went out
        (2, 6, {}, True, [], [("final", 0, 0, P + 1)]),
        (2, 6, {}, False, [(4, P)], [("final", 0, 0, P + 1)]),
        (2, 6, {(4, P): TOKEN}, True, [], [("final", 0, 0, P + 1)]),
        # and says so to the stage after it: the flag passes through, or is set by its own head
        (2, 4, {}, True, [], [("acts", 0, 0, P, 1, P, True)]),
        (2, 4, {}, False, [(4, P)], [("acts", 0, 0, P, 1, P, False)]),
        (2, 4, {(4, P): TOKEN}, False, [(4, P)], [("early", 0, 0, P + 1, TOKEN, 4), ("acts", 0, 0, P, 1, P, True)]),
    ],
)
def test_emitted_positions_are_not_evaluated_again(start, end, exits, emitted, evaluated, outputs):
    stage = make_stage(start, end, (4,), exits, "eager")
    prefill(stage)
    stage.receive(item(stage, P, emitted=emitted))
    assert drain(stage) == outputs
    assert stage.heads.calls == evaluated
    # the head layer still splits the run: the chunks are the same with or without an exit
    assert stage.model.calls == [(0, P, a, b, 1) for a, b in ((start, 4), (4, end)) if a < b]


# --- which positions the last stage predicts ------------------------------------------------


@pytest.mark.parametrize(
    "pos, rows, predict_from, finals",
    [
        (0, P, -1, [P]),  # a prompt: only its last position
        (0, P, 1, [2, 3]),
        (P, 2, P, [P + 1, P + 2]),  # a merged chunk from upstream: every decoded position
        (P, 2, P + 1, [P + 2]),
    ],
)
def test_the_last_stage_predicts_from_predict_from_on(pos, rows, predict_from, finals):
    stage = make_stage(2, 6, (), policy="off")
    if pos:
        stage.receive(item(stage, 0, pos))
        drain(stage)
        stage.model.lm_head_rows.clear()
    stage.receive(item(stage, pos, rows, predict_from=predict_from))
    assert drain(stage) == [("final", 0, 0, p) for p in finals]
    assert stage.model.lm_head_rows == [len(finals)]  # the LM head sees only those rows


# --- epochs: what a rollback purges ------------------------------------------------------------


def _pending(policy: str, kind: str) -> Stage:
    """A single stage after the prompt with token P's work pending as ``kind``."""
    stage = make_stage(0, 6, (2,), {(2, P): TOKEN} if kind != "queued" else {}, policy)
    prefill(stage)
    stage.receive(item(stage, P))
    if kind != "queued":  # parked (deferred) or first in the queue (eager)
        assert pull(stage) == ("early", 0, 0, P + 1, TOKEN, 2)
    return stage


PENDING = [("deferred", "parked"), ("eager", "backfill"), ("deferred", "queued")]


@pytest.mark.parametrize("policy, kind", PENDING)
@pytest.mark.parametrize(
    "purge, outputs, new_calls, keep",
    [
        (Rollback(0, 1, P), [], [], P),
        # a newer epoch's data implies the same rollback, to its position
        (StepRequest(0, 1, P, (4,)), [("final", 0, 1, P + 1)], [(0, P, 0, 2, 1), (0, P, 2, 6, 1)], P),
        (SequenceFinished(0, "eos"), [], [], None),
    ],
    ids=["rollback", "newer-epoch-data", "finished"],
)
def test_a_newer_epoch_or_the_end_purges_pending_work(policy, kind, purge, outputs, new_calls, keep):
    stage = _pending(policy, kind)
    stage.heads.exits.clear()  # the new epoch's token does not exit
    calls = list(stage.model.calls)
    stage.receive(purge)
    if keep is not None:
        assert stage.model.truncations[-1] == (0, keep)
        assert lengths(stage) == [keep] * L  # truncated on receipt, before anything runs
    assert drain(stage) == outputs
    assert stage.model.calls == calls + new_calls
    assert stage.stats.idle_backfills == 0
    assert stage.state is StageState.RUNNING
    assert (0 in stage.slots) == (keep is not None)  # the end frees the cache slot


@pytest.mark.parametrize("policy, kind", PENDING)
def test_a_rollback_of_the_current_epoch_purges_nothing(policy, kind):
    stage = _pending(policy, kind)
    stage.receive(Rollback(0, 0, 1))  # not newer than what the stage holds: a late duplicate
    assert stage.model.truncations == []
    assert drain(stage) == [("final", 0, 0, P + 1)]
    assert lengths(stage) == [P + 1] * L


def test_a_rollback_of_one_sequence_leaves_another_sequences_parked_work():
    stage = make_stage(0, 6, (2,), {}, "deferred", num_slots=2)
    prefill(stage, seq=0)
    prefill(stage, seq=1)
    stage.heads.exits[(2, P)] = TOKEN
    for seq in (0, 1):
        stage.receive(item(stage, P, seq=seq))
        assert pull(stage) == ("early", seq, 0, P + 1, TOKEN, 2)
    stage.receive(Rollback(0, 1, P))
    assert drain(stage) == [("final", 1, 0, P + 1)]
    assert stage.model.calls[2:] == [(1, P, 2, 6, 1)]
    assert lengths(stage, 0) == [P] * L and lengths(stage, 1) == [P + 1] * L


@pytest.mark.parametrize(
    "setup, event",
    [
        (Rollback(0, 1, P), StepRequest(0, 0, P, (7,))),  # an older epoch
        (SequenceFinished(0, "length"), StepRequest(0, 0, P, (7,))),  # a finished sequence
        (SequenceFinished(0, "length"), StepRequest(0, 3, P, (7,))),  # even of a newer epoch
    ],
    ids=["older-epoch", "finished", "finished-newer-epoch"],
)
def test_stale_items_are_dropped(setup, event):
    stage = make_stage(0, 6, (2,), {}, "deferred")
    prefill(stage)
    stage.receive(setup)
    truncations = list(stage.model.truncations)
    stage.receive(event)
    assert stage.stats.dropped_stale == 1
    assert stage.next_action() is WAITING
    assert stage.model.calls == [] and stage.model.truncations == truncations


def test_shutdown_abandons_queued_and_parked_work():
    stage = _pending("deferred", "parked")
    stage.receive(item(stage, P + 1))
    stage.receive(Shutdown())
    assert stage.state is StageState.SHUTDOWN
    calls = list(stage.model.calls)
    assert stage.next_action() is DONE
    assert stage.model.calls == calls


# --- illegal moves -----------------------------------------------------------------------------


def _running(start=0, end=L, num_slots=1) -> Stage:
    stage = make_stage(start, end, (2, 4), {(2, P): TOKEN}, "deferred", num_slots)
    prefill(stage)
    return stage


def _parked() -> Stage:
    stage = _running()
    stage.receive(item(stage, P))
    assert pull(stage)[0] == "early"
    return stage


def _shut_down() -> Stage:
    stage = _running()
    stage.receive(Shutdown())
    return stage


def _errored() -> Stage:
    stage = _running()
    with pytest.raises(ProtocolError):
        stage.receive(Verified(0, P, (1,)))
    return stage


def _int_hidden(rows: int = 1) -> torch.Tensor:
    return torch.zeros(rows, 2, dtype=torch.int64)


@pytest.mark.parametrize(
    "make, event, at_receive, seq",
    [
        pytest.param(lambda: _running(2, 6), StepRequest(0, 0, P, (7,)), True, 0, id="tokens-to-a-later-stage"),
        pytest.param(lambda: _running(2, 6), Activations(0, 0, P, 0, _int_hidden()), True, 0, id="layer-0-to-layer-2"),
        pytest.param(lambda: _running(2, 6), Activations(0, 0, P, 3, _int_hidden()), True, 0, id="layer-3-to-layer-2"),
        # positions that are not the cache length: found when the item runs
        pytest.param(_running, StepRequest(0, 0, P + 1, (7,)), False, 0, id="gap"),
        pytest.param(_running, StepRequest(0, 0, P - 1, (7,)), False, 0, id="overlap-in-the-same-epoch"),
        pytest.param(_parked, StepRequest(0, 0, P + 2, (7,)), False, 0, id="gap-after-a-parked-token"),
        pytest.param(_parked, StepRequest(0, 0, P, (7,)), False, 0, id="the-parked-token-again"),
        # events a stage never takes
        pytest.param(_running, FinalPrediction(0, 0, P, 7), True, 0, id="final-prediction"),
        pytest.param(_running, EarlyPrediction(0, 0, P, 7, 2, 0.9), True, 0, id="early-prediction"),
        pytest.param(_running, Verified(0, P, (7,)), True, 0, id="verified"),
        # nothing after the end, nothing after an error
        pytest.param(_shut_down, StepRequest(0, 0, P, (7,)), True, 0, id="step-after-shutdown"),
        pytest.param(_shut_down, Rollback(0, 1, P), True, 0, id="rollback-after-shutdown"),
        pytest.param(_shut_down, Shutdown(), True, "-", id="shutdown-twice"),
        pytest.param(_errored, StepRequest(0, 0, P, (7,)), True, 0, id="step-after-error"),
        pytest.param(_errored, Rollback(0, 1, P), True, 0, id="rollback-after-error"),
    ],
)
def test_illegal_moves_raise_and_leave_the_stage_in_error(make, event, at_receive, seq):
    stage = make()
    calls = list(stage.model.calls)
    with pytest.raises(ProtocolError, match=f"sequence {seq}"):
        stage.receive(event)
        assert not at_receive, "receive() accepted an illegal event"
        stage.next_action()
    assert stage.state is StageState.ERROR
    assert stage.model.calls == calls  # nothing ran
    with pytest.raises(ProtocolError):  # and nothing is accepted any more
        stage.receive(Rollback(0, 9, 0))


def test_a_sequence_without_a_free_cache_slot_leaves_the_stage_in_error():
    stage = _running()  # one slot, held by sequence 0
    stage.receive(StepRequest(1, 0, 0, PROMPT))
    with pytest.raises(ProtocolError, match="no free cache slot for sequence 1"):
        stage.next_action()
    assert stage.model.calls == []
    assert stage.state is StageState.ERROR


# --- batching: items of several sequences in one call ---------------------------------------------


def batched_stage(start=0, end=L, head_layers=(), exits=None, policy="eager", max_batch=4) -> Stage:
    stage = make_stage(start, end, head_layers, exits, policy, num_slots=4, max_batch=max_batch)
    for seq in range(3):
        prefill(stage, seq=seq)
    stage.model.batches.clear()
    return stage


def test_fresh_items_of_different_sequences_at_one_layer_run_as_one_call():
    stage = batched_stage(0, L)
    for seq in range(3):
        stage.receive(item(stage, P, seq=seq))
    out = drain(stage)
    assert stage.model.batches == [([(0, P, 1), (1, P, 1), (2, P, 1)], 0, L)]
    assert stage.model.calls == []  # no single calls besides
    assert out == [o for seq in range(3) for o in out_of(stage, P, seq=seq)]
    assert stage.model.lm_head_rows == [1, 1, 1]  # exact batches: each sequence's LM head as alone
    assert stage.stats.batched == 1 and all(lengths(stage, slot) == [P + 1] * L for slot in range(3))


@pytest.mark.parametrize("start, end", [(0, 3), (3, L)], ids=["first", "last"])
def test_a_pipeline_stage_runs_its_share_of_the_sequences_in_flight_per_call(start, end):
    # 3 sequences in flight on 2 stages: calls of 2 (ceil(3 / 2)), so that the other stage has a
    # group of its own to run meanwhile, where one call of 3 would leave it idle
    stage = batched_stage(start, end)
    for seq in range(3):
        stage.receive(item(stage, P, seq=seq))
    out = drain(stage)
    assert stage.model.batches == [([(0, P, 1), (1, P, 1)], start, end)]
    assert stage.model.calls == [(2, P, start, end, 1)]  # the third alone, next
    assert out == [o for seq in range(3) for o in out_of(stage, P, seq=seq)]
    stage.receive(SequenceFinished(2, "eos"))  # 2 in flight: one call each
    for seq in range(2):
        stage.receive(item(stage, P + 1, seq=seq))
    drain(stage)
    assert stage.model.batches[1:] == []
    assert stage.model.calls[1:] == [(0, P + 1, start, end, 1), (1, P + 1, start, end, 1)]


def test_max_batch_caps_a_call_and_one_sequence_never_batches_with_itself():
    stage = batched_stage(max_batch=2)
    stage.receive(item(stage, P, seq=0))
    stage.receive(item(stage, P + 1, seq=0))  # its next token: after the first, never beside it
    stage.receive(item(stage, P, seq=1))
    stage.receive(item(stage, P, seq=2))
    drain(stage)
    assert stage.model.batches == [([(0, P, 1), (1, P, 1)], 0, L), ([(0, P + 1, 1), (2, P, 1)], 0, L)]


def test_an_exit_inside_a_batch_goes_out_at_once_and_its_eager_backfill_leads_the_rest():
    exits = {(2, P): TOKEN}  # confident for every sequence at layer 2, position P
    stage = batched_stage(head_layers=(2,), exits=exits, policy="eager")
    for seq in range(2):
        stage.receive(item(stage, P, seq=seq))
    assert pull(stage) == ("early", 0, 0, P + 1, TOKEN, 2)  # at the boundary, before any layer above
    assert stage.model.batches == [([(0, P, 1), (1, P, 1)], 0, 2)]
    out = drain(stage)
    assert out[0] == ("early", 1, 0, P + 1, TOKEN, 2)
    # the two backfills, at the same layer, run on as one call
    assert stage.model.batches[1:] == [([(0, P, 1), (1, P, 1)], 2, L)]
    assert out[1:] == out_of(stage, P, seq=0, emitted=True) + out_of(stage, P, seq=1, emitted=True)


@pytest.mark.parametrize("start, calls", [(0, [3]), (3, [2, 1])], ids=["only", "last"])
def test_fused_batches_share_one_lm_head_call(start, calls):
    stage = batched_stage(start=start, end=L)
    stage.exact_batches = False
    for seq in range(3):
        stage.receive(item(stage, P, seq=seq))
    drain(stage)
    # one LM head call, one transfer, for all of a call's sequences (on the last of 2 stages, its share of 3)
    assert stage.model.lm_head_rows == calls
