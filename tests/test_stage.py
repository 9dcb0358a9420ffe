"""The Stage, driven by hand-made events over a tiny random-weight model.

As in h11's test_state.py: build a Stage, push events with ``receive``, pull with
``next_action``, and assert on the outputs, the cache lengths and the state.
"""

from __future__ import annotations

import functools

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
from adadecode.runtime.hf_adapter import ModelArgs, load_hf_config, load_stage_modules
from adadecode.runtime.model_runner import StageModel
from adadecode.runtime.stage import FinishedSeqs, Stage, StageState
from helpers import hf_greedy

PROMPT = (5, 17, 3, 42, 8)
P = len(PROMPT)
D = 64  # helpers.TINY hidden_size
TWO = [(0, 3), (3, 6)]


@functools.cache
def _modules(model_dir, a: int, b: int, embed: bool, head: bool):
    # Loading is the slow part; the modules are read-only, so tests share them and
    # each Stage gets a fresh StageModel (and so a fresh KV cache).
    config = load_hf_config(model_dir)
    return load_stage_modules(model_dir, config, a, b, embed=embed, head=head), ModelArgs.from_hf_config(config)


def make_stage(model_dir, index: int, ranges, num_slots: int = 1) -> Stage:
    a, b = ranges[index]
    modules, args = _modules(model_dir, a, b, index == 0, index == len(ranges) - 1)
    return Stage(index, len(ranges), StageModel(modules, args, 32, num_slots))


def stages(model_dir, ranges=TWO) -> list[Stage]:
    return [make_stage(model_dir, i, ranges) for i in range(len(ranges))]


def drain(stage: Stage) -> list:
    out = []
    while True:
        action = stage.next_action()
        if action is WAITING or action is DONE:
            return out
        out.append(action)


def lengths(stage: Stage, slot: int = 0) -> list[int]:
    return [stage.model.cache_length(layer, slot) for layer in range(stage.start, stage.end)]


def same(a, b) -> bool:
    """Outputs equal field by field, hidden states bit for bit."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Activations):
        return (a.seq, a.epoch, a.pos, a.layer) == (b.seq, b.epoch, b.pos, b.layer) and torch.equal(a.hidden, b.hidden)
    return a == b


def same_all(xs, ys) -> bool:
    return len(xs) == len(ys) and all(same(x, y) for x, y in zip(xs, ys))


# --- every (state, event type) ---------------------------------------------------------------

# What a legal event does on a single stage after the prompt: the state it leads to and what
# next_action() hands out then (a position: the FinalPrediction for it). Every other pair is illegal.
LEGAL = {
    StageState.RUNNING: {
        StepRequest: (StageState.RUNNING, P + 1),
        Activations: (StageState.RUNNING, P + 1),
        Rollback: (StageState.RUNNING, WAITING),
        SequenceFinished: (StageState.RUNNING, WAITING),
        Shutdown: (StageState.SHUTDOWN, DONE),
    },
    StageState.SHUTDOWN: {},
    StageState.ERROR: {SequenceFinished: (StageState.ERROR, ProtocolError)},  # frees the slot; runs nothing more
}

EVENT_TYPES = [
    StepRequest, Activations, Rollback, SequenceFinished, Shutdown, FinalPrediction, EarlyPrediction, Verified
]


def stage_in(model_dir, state: StageState) -> Stage:
    stage = stages(model_dir, [(0, 6)])[0]
    stage.receive(StepRequest(0, 0, 0, PROMPT))
    drain(stage)
    if state is StageState.SHUTDOWN:
        stage.receive(Shutdown())
    elif state is StageState.ERROR:
        with pytest.raises(ProtocolError):
            stage.receive(Verified(0, P, (1,)))
    assert stage.state is state
    return stage


def event_of(event_type: type):
    return {
        StepRequest: lambda: StepRequest(0, 0, P, (7,)),
        Activations: lambda: Activations(0, 0, P, 0, torch.zeros(1, D)),
        Rollback: lambda: Rollback(0, 1, P - 1),
        SequenceFinished: lambda: SequenceFinished(0, "eos"),
        Shutdown: lambda: Shutdown(),
        FinalPrediction: lambda: FinalPrediction(0, 0, P, 7),
        EarlyPrediction: lambda: EarlyPrediction(0, 0, P, 7, 2, 0.9),
        Verified: lambda: Verified(0, P, (7,)),
    }[event_type]()


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("state", list(StageState), ids=lambda s: s.name)
def test_every_transition(model_dir, state, event_type):
    stage = stage_in(model_dir, state)
    event = event_of(event_type)
    if event_type in LEGAL[state]:
        next_state, then = LEGAL[state][event_type]
        stage.receive(event)
        assert stage.state is next_state
        if then is ProtocolError:
            with pytest.raises(ProtocolError, match="in state ERROR"):
                stage.next_action()
            return
        out = stage.next_action()
        if isinstance(then, int):
            assert isinstance(out, FinalPrediction) and (out.seq, out.epoch, out.pos) == (0, 0, then)
        else:
            assert out is then
    else:
        with pytest.raises(ProtocolError) as exc:
            stage.receive(event)
        message = str(exc.value)
        assert state.name in message and event_type.__name__ in message
        assert f"sequence {getattr(event, 'seq', '-')}" in message
        assert stage.state is StageState.ERROR


# --- data flow -------------------------------------------------------------------------------


def test_first_stage_turns_a_step_request_into_activations(model_dir):
    s0, s1 = stages(model_dir)
    assert s0.next_action() is WAITING
    s0.receive(StepRequest(0, 0, 0, PROMPT))
    assert lengths(s0) == [0, 0, 0]  # receive only records
    out = s0.next_action()
    assert isinstance(out, Activations)
    assert (out.seq, out.epoch, out.pos, out.layer) == (0, 0, 0, 3)
    assert out.hidden.shape == (P, D)
    assert s0.next_action() is WAITING
    assert lengths(s0) == [P] * 3 and lengths(s1) == [0] * 3
    assert (s0.stats.items, s0.stats.positions) == (1, P)

    s1.receive(out)
    final = s1.next_action()
    assert final == FinalPrediction(0, 0, P, final.token)
    assert lengths(s1) == [P] * 3
    assert s1.next_action() is WAITING


def test_single_stage_yields_the_final_prediction_of_greedy(model_dir):
    (stage,) = stages(model_dir, [(0, 6)])
    stage.receive(StepRequest(0, 0, 0, PROMPT))
    out = stage.next_action()
    assert isinstance(out, FinalPrediction)
    assert (out.seq, out.epoch, out.pos) == (0, 0, P)
    expected = hf_greedy(model_dir, list(PROMPT), 3)
    assert out.token == expected[0]
    # decode two more tokens one position at a time
    tokens = [out.token]
    for i in range(2):
        stage.receive(StepRequest(0, 0, P + i, (tokens[-1],)))
        out = stage.next_action()
        assert (out.pos, out.epoch) == (P + i + 1, 0)
        tokens.append(out.token)
    assert tokens == expected


def test_two_stages_predict_what_one_stage_predicts(model_dir):
    (single,) = stages(model_dir, [(0, 6)])
    s0, s1 = stages(model_dir)
    single.receive(StepRequest(0, 0, 0, PROMPT))
    s0.receive(StepRequest(0, 0, 0, PROMPT))
    s1.receive(s0.next_action())
    assert s1.next_action() == single.next_action()


@pytest.mark.parametrize("ranges", [[(0, 6)], TWO])
def test_a_request_with_drafts_predicts_every_drafts_position(model_dir, ranges):
    """A decode request's drafts (``StepRequest.drafts``) run with its token as one chunk, and the
    final layer predicts each position, the drafts' included: the tokens plain decoding of the
    same tokens gives, which is how the Coordinator verifies them."""
    expected = hf_greedy(model_dir, list(PROMPT), 5)
    pipeline = stages(model_dir, ranges)

    def run(event):
        pipeline[0].receive(event)
        out = drain(pipeline[0])
        for stage in pipeline[1:]:
            for item in out:
                stage.receive(item)
            out = drain(stage)
        return out

    assert run(StepRequest(0, 0, 0, PROMPT)) == [FinalPrediction(0, 0, P, expected[0])]
    # the token, then two right drafts and a wrong one: four positions, four predictions
    out = run(StepRequest(0, 0, P, (expected[0], expected[1], expected[2], 0), drafts=3))
    assert [(o.pos, o.token) for o in out] == [(P + 1, expected[1]), (P + 2, expected[2]), (P + 3, expected[3]),
                                               (P + 4, out[-1].token)]
    assert all(lengths(stage) == [P + 4] * (stage.end - stage.start) for stage in pipeline)


def test_an_item_with_drafts_reads_no_head(model_dir):
    """Nothing starts early on top of drafts: a head, even one confident about everything, is not
    evaluated on a request that carries them, and the chunk runs through."""
    from test_compiled_step import random_heads

    s0, s1 = stages(model_dir)
    heads = random_heads([s0, s1], threshold=0.0)
    s0.heads = s1.heads = heads.select([2], {2: 0.0})
    s0.policy = "deferred"
    s0.receive(StepRequest(0, 0, 0, PROMPT))
    assert isinstance(drain(s0)[0], EarlyPrediction)  # the head is confident on a plain item
    evals = s0.stats.head_evals
    s0.receive(StepRequest(0, 0, P, (3, 4, 5), drafts=2))
    (out,) = [o for o in drain(s0) if o.pos == P]
    assert isinstance(out, Activations) and out.hidden.shape[0] == 3 and s0.stats.head_evals == evals


@pytest.mark.parametrize("drafts", [1, -1])
def test_a_request_that_is_all_drafts_raises(model_dir, drafts):
    (stage,) = stages(model_dir, [(0, 6)])
    with pytest.raises(ProtocolError, match="drafts"):
        stage.receive(StepRequest(0, 0, 0, (7,), drafts=drafts))


def test_step_request_to_a_later_stage_raises(model_dir):
    _, s1 = stages(model_dir)
    with pytest.raises(ProtocolError, match="StepRequest") as exc:
        s1.receive(StepRequest(0, 0, 0, PROMPT))
    assert "sequence 0" in str(exc.value)
    assert s1.state is StageState.ERROR
    with pytest.raises(ProtocolError):
        s1.receive(Rollback(0, 1, 0))


@pytest.mark.parametrize("layer", [0, 2, 4, 6])
def test_activations_for_the_wrong_layer_raise(model_dir, layer):
    _, s1 = stages(model_dir)
    with pytest.raises(ProtocolError, match=f"layer {layer}") as exc:
        s1.receive(Activations(0, 0, 0, layer, torch.zeros(P, D)))
    assert "sequence 0" in str(exc.value)
    assert s1.state is StageState.ERROR
    assert lengths(s1) == [0, 0, 0]


@pytest.mark.parametrize("pos", [P + 2, P - 1, 0], ids=["gap", "overlap", "restart"])
def test_a_position_that_is_not_the_cache_length_raises(model_dir, pos):
    (stage,) = stages(model_dir, [(0, 6)])
    stage.receive(StepRequest(0, 0, 0, PROMPT))
    drain(stage)
    stage.receive(StepRequest(0, 0, pos, (7,)))
    with pytest.raises(ProtocolError, match=f"position {pos}") as exc:
        stage.next_action()
    assert f"holds {P}" in str(exc.value) and "sequence 0" in str(exc.value)
    assert stage.state is StageState.ERROR
    assert lengths(stage) == [P] * 6  # nothing written
    with pytest.raises(ProtocolError):
        stage.receive(StepRequest(0, 0, P, (7,)))


# --- epochs and rollback --------------------------------------------------------------------


def prefill_and_step(stage: Stage, steps=(7, 9)) -> list:
    """Prompt, then one token at a time; returns the outputs."""
    stage.receive(StepRequest(0, 0, 0, PROMPT))
    for i, token in enumerate(steps):
        stage.receive(StepRequest(0, 0, P + i, (token,)))
    return drain(stage)


def test_an_item_of_an_older_epoch_is_dropped(model_dir):
    (stage,) = stages(model_dir, [(0, 6)])
    prefill_and_step(stage)
    stage.receive(Rollback(0, 1, P))
    assert lengths(stage) == [P] * 6
    stage.receive(StepRequest(0, 0, P, (7,)))
    assert stage.stats.dropped_stale == 1
    assert stage.next_action() is WAITING
    assert lengths(stage) == [P] * 6
    stage.receive(Activations(0, 0, P, 0, torch.zeros(1, D)))  # older epoch on the data path too
    assert stage.stats.dropped_stale == 2 and stage.next_action() is WAITING


def test_an_older_epoch_item_is_dropped_on_a_later_stage(model_dir):
    s0, s1 = stages(model_dir)
    s0.receive(StepRequest(0, 0, 0, PROMPT))
    s0.receive(StepRequest(0, 0, P, (7,)))
    prompt_acts, step_acts = drain(s0)
    s1.receive(prompt_acts)
    drain(s1)
    s1.receive(Rollback(0, 1, P))
    s1.receive(step_acts)  # epoch 0 work still in transit
    assert s1.stats.dropped_stale == 1
    assert s1.next_action() is WAITING and lengths(s1) == [P] * 3


@pytest.mark.parametrize("first", [True, False], ids=["stage0", "stage1"])
def test_a_newer_epoch_item_truncates_the_cache_first(model_dir, first):
    # original: prompt, 7 at P, 9 at P+1; then epoch 1 replaces P+1 with 4
    ref0, ref1 = stages(model_dir)
    s0, s1 = stages(model_dir)
    s0.receive(StepRequest(0, 0, 0, PROMPT))
    for i, token in enumerate((7, 9)):
        s0.receive(StepRequest(0, 0, P + i, (token,)))
    for acts in drain(s0):
        s1.receive(acts)
    drain(s1)
    assert lengths(s0) == lengths(s1) == [P + 2] * 3

    s0.receive(StepRequest(0, 1, P + 1, (4,)))  # no Rollback seen yet
    assert lengths(s0) == [P + 1] * 3  # truncated on receipt, before running
    new_acts = s0.next_action()
    assert (new_acts.epoch, new_acts.pos) == (1, P + 1)
    assert lengths(s0) == [P + 2] * 3
    s1.receive(new_acts)
    assert lengths(s1) == [P + 1] * 3
    new_final = s1.next_action()
    assert new_final.epoch == 1 and new_final.pos == P + 2

    # the same as if the replaced token had never been there
    ref0.receive(StepRequest(0, 0, 0, PROMPT))
    for i, token in enumerate((7, 4)):
        ref0.receive(StepRequest(0, 0, P + i, (token,)))
    ref_acts = drain(ref0)
    assert torch.equal(ref_acts[-1].hidden, new_acts.hidden)
    for acts in ref_acts:
        ref1.receive(acts)
    assert drain(ref1)[-1].token == new_final.token
    for layer in range(3):
        for a, b in ((s0, ref0), (s1, ref1)):
            n = P + 2
            assert torch.equal(a.model.cache.k[layer][0, :, :n], b.model.cache.k[layer][0, :, :n])
            assert torch.equal(a.model.cache.v[layer][0, :, :n], b.model.cache.v[layer][0, :, :n])


def test_rollback_truncates_every_layer(model_dir):
    s0, s1 = stages(model_dir)
    s0.receive(StepRequest(0, 0, 0, PROMPT))
    s0.receive(StepRequest(0, 0, P, (7,)))
    s0.receive(StepRequest(0, 0, P + 1, (9,)))
    for acts in drain(s0):
        s1.receive(acts)
    drain(s1)
    for stage in (s0, s1):
        stage.receive(Rollback(0, 1, P))
        assert lengths(stage) == [P] * 3
        assert stage.epochs[0] == 1


def test_a_repeated_or_older_rollback_is_a_no_op(model_dir):
    (stage,) = stages(model_dir, [(0, 6)])
    prefill_and_step(stage)
    stage.receive(Rollback(0, 1, P))
    stage.receive(StepRequest(0, 1, P, (4,)))
    drain(stage)
    assert lengths(stage) == [P + 1] * 6
    # the same rollback delivered twice, or an older one late: the new epoch's work stays
    stage.receive(Rollback(0, 1, P))
    stage.receive(Rollback(0, 0, 2))
    assert lengths(stage) == [P + 1] * 6 and stage.epochs[0] == 1


def _rollback_scenario(model_dir, rollback_first: bool, old_work_ran: bool) -> tuple[list, list[int], int]:
    """Stage 0 of two: the prompt runs, an early token (epoch 0) is sent at P, then the
    Coordinator rejects it: Rollback(epoch 1, keep P) and the corrected token at P."""
    s0, _ = stages(model_dir)
    s0.receive(StepRequest(0, 0, 0, PROMPT))
    drain(s0)
    s0.receive(StepRequest(0, 0, P, (7,)))  # the early token
    if old_work_ran:
        drain(s0)
    events = [Rollback(0, 1, P), StepRequest(0, 1, P, (4,))]
    for event in events if rollback_first else events[::-1]:
        s0.receive(event)
    s0.receive(StepRequest(0, 1, P + 1, (11,)))
    return drain(s0), lengths(s0), s0.stats.items


@pytest.mark.parametrize(
    "old_work_ran",
    [
        pytest.param(True, id="old-work-already-ran"),
        pytest.param(False, id="old-work-still-queued"),
    ],
)
def test_rollback_and_new_data_give_the_same_result_in_either_order(model_dir, old_work_ran):
    out_rb, len_rb, items_rb = _rollback_scenario(model_dir, rollback_first=True, old_work_ran=old_work_ran)
    assert [(a.epoch, a.pos) for a in out_rb] == [(1, P), (1, P + 1)]  # the old epoch never ran, or ran before
    out_data, len_data, items_data = _rollback_scenario(model_dir, rollback_first=False, old_work_ran=old_work_ran)
    assert same_all(out_rb, out_data)
    assert len_rb == len_data == [P + 2] * 3
    assert items_rb == items_data


def test_rollback_purges_queued_older_work(model_dir):
    (stage,) = stages(model_dir, [(0, 6)])
    stage.receive(StepRequest(0, 0, 0, PROMPT))
    drain(stage)
    stage.receive(StepRequest(0, 0, P, (7,)))  # two early tokens, queued
    stage.receive(StepRequest(0, 0, P + 1, (9,)))
    stage.receive(Rollback(0, 1, P))
    assert drain(stage) == []
    assert stage.stats.items == 1  # only the prompt ever ran
    assert lengths(stage) == [P] * 6


def test_rollback_for_one_sequence_leaves_another_alone(model_dir):
    stage = make_stage(model_dir, 0, [(0, 6)], num_slots=2)
    ref = make_stage(model_dir, 0, [(0, 6)], num_slots=2)
    for s in (stage, ref):
        s.receive(StepRequest(0, 0, 0, PROMPT))
        s.receive(StepRequest(1, 0, 0, PROMPT[:3]))
        drain(s)
    stage.receive(StepRequest(0, 0, P, (7,)))
    stage.receive(StepRequest(1, 0, 3, (7,)))
    stage.receive(Rollback(0, 1, P))  # only sequence 0's queued step is discarded
    ref.receive(StepRequest(1, 0, 3, (7,)))
    assert drain(stage) == drain(ref)
    assert lengths(stage, stage.slots[0]) == [P] * 6
    assert lengths(stage, stage.slots[1]) == [4] * 6


def test_interleaved_sequences_match_each_alone(model_dir):
    both = make_stage(model_dir, 0, [(0, 6)], num_slots=2)
    both.receive(StepRequest(0, 0, 0, PROMPT))
    both.receive(StepRequest(1, 0, 0, (9, 9, 1)))
    both.receive(StepRequest(0, 0, P, (7,)))
    both.receive(StepRequest(1, 0, 3, (2,)))
    out = drain(both)
    alone = []
    for requests in (
        [StepRequest(0, 0, 0, PROMPT), StepRequest(0, 0, P, (7,))],
        [StepRequest(1, 0, 0, (9, 9, 1)), StepRequest(1, 0, 3, (2,))],
    ):
        stage = make_stage(model_dir, 0, [(0, 6)])
        for r in requests:
            stage.receive(r)
        alone.append(drain(stage))
    assert out == [alone[0][0], alone[1][0], alone[0][1], alone[1][1]]


# --- end of a sequence, end of the stage ----------------------------------------------------


def test_sequence_finished_frees_the_slot_and_drops_later_items(model_dir):
    (stage,) = stages(model_dir, [(0, 6)])  # one cache slot
    stage.receive(StepRequest(0, 0, 0, PROMPT))
    first = drain(stage)
    stage.receive(StepRequest(0, 0, P, (7,)))  # queued, then the sequence ends
    stage.receive(SequenceFinished(0, "eos"))
    assert 0 not in stage.slots
    assert drain(stage) == []  # queued work purged
    stage.receive(StepRequest(0, 0, P + 1, (9,)))  # in-flight work draining
    stage.receive(Rollback(0, 5, 2))
    assert stage.stats.dropped_stale == 1
    assert stage.next_action() is WAITING
    # the slot is reused by a new sequence from position 0, with the same result
    stage.receive(StepRequest(1, 0, 0, PROMPT))
    (again,) = drain(stage)
    assert again == FinalPrediction(1, 0, P, first[0].token)
    assert stage.slots == {1: 0}
    assert lengths(stage) == [P] * 6


def test_a_second_sequence_without_a_free_slot_raises(model_dir):
    (stage,) = stages(model_dir, [(0, 6)])  # one cache slot
    stage.receive(StepRequest(0, 0, 0, PROMPT))
    stage.receive(StepRequest(1, 0, 0, PROMPT))
    assert isinstance(stage.next_action(), FinalPrediction)
    with pytest.raises(ProtocolError, match="no free cache slot for sequence 1"):
        stage.next_action()


def test_shutdown(model_dir):
    (stage,) = stages(model_dir, [(0, 6)])
    stage.receive(StepRequest(0, 0, 0, PROMPT))
    stage.receive(Shutdown())
    assert stage.state is StageState.SHUTDOWN
    assert stage.next_action() is DONE  # queued work is abandoned
    assert stage.next_action() is DONE
    assert stage.stats.items == 0
    with pytest.raises(ProtocolError, match="SHUTDOWN"):
        stage.receive(StepRequest(0, 0, 0, PROMPT))
    assert stage.state is StageState.ERROR
    with pytest.raises(ProtocolError):
        stage.receive(Shutdown())


def test_sequence_finished_frees_the_slot_even_in_error(model_dir):
    """Cleanup after a failure must free the slot of a stage that raised (runners/routing.py)."""
    (stage,) = stages(model_dir, [(0, 6)])
    stage.receive(StepRequest(0, 0, 0, PROMPT))
    drain(stage)
    with pytest.raises(ProtocolError):
        stage.receive(Verified(0, P, (1,)))
    stage.receive(SequenceFinished(0, "failed"))
    assert stage.state is StageState.ERROR and stage.slots == {} and 0 in stage.finished


# --- finished sequences in bounded memory ------------------------------------------------------


@pytest.mark.parametrize(
    "order, floor, held",
    [
        ([0, 1, 2, 3], 4, 0),  # in order: a watermark, nothing held one by one
        ([1, 3, 0], 2, 1),  # out of order: 3 waits above the floor until 2 finishes
        ([2, 1, 0, 4], 3, 1),
        ([5, 6], 0, 2),  # ids not from 0: exact, just held one by one
    ],
)
def test_finished_ids_collapse_into_a_watermark(order, floor, held):
    finished = FinishedSeqs()
    for seq in order:
        finished.add(seq)
        finished.add(seq)  # idempotent
    assert (finished.floor, len(finished)) == (floor, held)
    assert {seq for seq in range(10) if seq in finished} == set(order)


def test_a_stage_remembers_every_finished_sequence_in_bounded_memory(model_dir):
    """40 sequences through two slots, finished out of order in pairs: the stage holds at most one
    finished id one by one, and an item of any of them arriving late is still dropped."""
    stage = make_stage(model_dir, 0, [(0, 6)], num_slots=2)
    for seq in range(0, 40, 2):
        for s in (seq, seq + 1):
            stage.receive(StepRequest(s, 0, 0, PROMPT[:2], "off"))
        drain(stage)
        stage.receive(SequenceFinished(seq + 1, "eos"))
        assert len(stage.finished) == 1  # seq + 1 waits for seq
        stage.receive(SequenceFinished(seq, "length"))
        assert len(stage.finished) == 0 and stage.slots == {} and stage.epochs == {}
    assert stage.finished.floor == 40
    for late in (StepRequest(3, 0, 2, (7,)), Activations(30, 2, 9, 0, torch.zeros(1, D)), Rollback(7, 4, 1)):
        stage.receive(late)
    assert stage.stats.dropped_stale == 2 and stage.next_action() is WAITING and stage.epochs == {}
    assert stage.is_stale(FinalPrediction(39, 0, 3, 5)) and not stage.is_stale(FinalPrediction(40, 0, 3, 5))


def test_is_stale_names_older_epochs_and_finished_sequences(model_dir):
    s0, _ = stages(model_dir)
    s0.receive(StepRequest(0, 0, 0, PROMPT))
    s0.receive(StepRequest(0, 0, P, (7,)))
    prompt_acts = s0.next_action()
    assert not s0.is_stale(prompt_acts)
    s0.receive(Rollback(0, 1, P))  # what a runner learns between a step and its send
    assert s0.is_stale(prompt_acts) and not s0.is_stale(Activations(0, 1, P, 3, torch.zeros(1, D)))
    s0.receive(SequenceFinished(0, "eos"))
    assert s0.is_stale(Activations(0, 1, P, 3, torch.zeros(1, D)))


# --- the early-exit mode travels with the sequence ---------------------------------------------


def always_confident_heads(model_dir, layers):
    """Exit heads (T = identity) that are always confident: every evaluation exits."""
    from adadecode.runtime.exit_heads import ExitHeads

    last, _ = _modules(model_dir, 0, 6, True, True)
    eye = torch.eye(D)
    return ExitHeads({l: eye for l in layers}, last.norm, last.lm_head.weight, None, {l: -1.0 for l in layers}, {})


@pytest.mark.parametrize("default", ["off", "eager", "deferred"])
def test_each_item_runs_under_its_own_sequences_mode(model_dir, default):
    """Two sequences on one stage whose own default is ``default``: the one carrying ``eager``
    exits at the head and backfills at once; the one carrying ``off`` never evaluates a head;
    the activations they hand on carry their mode."""
    s0 = make_stage(model_dir, 0, TWO, num_slots=2)
    s0.heads, s0.policy = always_confident_heads(model_dir, [2]), default
    s0.receive(StepRequest(0, 0, 0, PROMPT, "eager"))
    s0.receive(StepRequest(1, 0, 0, PROMPT, "off"))
    out = drain(s0)
    assert [type(o).__name__ for o in out] == ["EarlyPrediction", "Activations", "Activations"]
    assert (out[0].seq, out[0].layer, out[1].seq, out[2].seq) == (0, 2, 0, 1)
    assert [(o.early_exit, o.emitted) for o in out[1:]] == [("eager", True), ("off", False)]
    assert s0.stats.head_evals == 1
    # an item without a mode falls back to the stage's default
    s0.receive(StepRequest(1, 0, P, (7,)))
    exits = [] if default == "off" else ["EarlyPrediction"]  # then the backfill, at once or when idle
    assert [type(o).__name__ for o in drain(s0)] == [*exits, "Activations"]


def test_an_unknown_mode_is_a_protocol_error(model_dir):
    s0, s1 = stages(model_dir)
    with pytest.raises(ProtocolError, match="early_exit `fast`.*sequence 4"):
        s0.receive(StepRequest(4, 0, 0, PROMPT, "fast"))
    assert s0.state is StageState.ERROR
    with pytest.raises(ProtocolError, match="early_exit `fast`"):
        s1.receive(Activations(4, 0, 0, 3, torch.zeros(1, D), early_exit="fast"))


def test_sequence_finished_drops_outputs_not_handed_out_yet(model_dir):
    """A runner that learns of the end between two next_action() calls must get nothing more of
    the sequence: after its release a rank sends nothing of it (runners/distributed.py)."""
    s0, s1 = stages(model_dir)
    s0.receive(StepRequest(0, 0, 0, PROMPT))
    acts = s0.next_action()
    s1.receive(Activations(0, 0, 0, 3, acts.hidden, predict_from=0))  # P final predictions at once
    first = s1.next_action()
    assert isinstance(first, FinalPrediction) and first.pos == 1  # P - 1 more are ready
    s1.receive(SequenceFinished(0, "length"))
    assert s1.next_action() is WAITING
