"""The Coordinator, driven by hand-made events (in the style of h11's test_state.py).

No model and no stages: each test builds a Coordinator, pushes predictions with
``receive`` and asserts on what ``next_action`` hands out and on the sequence's state.
"""

from __future__ import annotations

import random

import pytest
import torch
from adadecode.runtime.coordinator import Coordinator, SeqState
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
from adadecode.runtime.sampling import SamplingParams
from adadecode.runtime.stopping import StopCriteria

PROMPT = (11, 12, 13)
P = len(PROMPT)  # the first generated token goes at position P
EOS = 2


def drain(coord: Coordinator) -> list:
    """Every command ``next_action`` hands out before its sentinel (``WAITING`` or ``DONE``)."""
    out = []
    while True:
        action = coord.next_action()
        if action is WAITING or action is DONE:
            return out
        out.append(action)


def make(
    max_new_tokens: int = 8,
    max_inflight: int = 0,
    eos: tuple[int, ...] = (EOS,),
    stop: tuple[str, ...] = (),
    decode=None,
) -> Coordinator:
    """A Coordinator holding sequence 0 with the prompt already handed to stage 0."""
    coord = Coordinator(max_inflight=max_inflight)
    coord.add_sequence(0, list(PROMPT), StopCriteria(max_new_tokens, frozenset(eos), stop, decode))
    assert drain(coord) == [StepRequest(0, 0, 0, PROMPT)]
    return coord


def final(pos: int, token: int, epoch: int = 0, seq: int = 0) -> FinalPrediction:
    return FinalPrediction(seq, epoch, pos, token)


def early(pos: int, token: int, epoch: int = 0, seq: int = 0, layer: int = 2) -> EarlyPrediction:
    return EarlyPrediction(seq, epoch, pos, token, layer, 0.9)


# --- every (state, event type) ---------------------------------------------------------------

# The event types each state accepts; every other pair is illegal. What they do is ``legal_outcome``.
LEGAL = {
    SeqState.PREFILL: {FinalPrediction, EarlyPrediction},
    SeqState.DECODING: {FinalPrediction, EarlyPrediction},
    SeqState.FINISHED: {FinalPrediction, EarlyPrediction},
    SeqState.ERROR: set(),
}

EVENT_TYPES = [FinalPrediction, EarlyPrediction, StepRequest, Rollback, SequenceFinished, Verified, Activations]


def legal_outcome(state: SeqState, event) -> tuple[SeqState, list]:
    """The state a legal prediction (token 5, at the next position) leads to, and the commands it gives."""
    if state is SeqState.FINISHED:
        return SeqState.FINISHED, []  # in-flight work draining after the end: dropped
    started = StepRequest(0, 0, event.pos, (5,))
    if isinstance(event, FinalPrediction):
        return SeqState.DECODING, [Verified(0, event.pos, (5,)), started]
    return state, [started]  # an early token is started, not shown, and changes no state


def coord_in(state: SeqState) -> Coordinator:
    coord = make(max_new_tokens=1 if state is SeqState.FINISHED else 8, max_inflight=2)
    if state in (SeqState.DECODING, SeqState.FINISHED):
        coord.receive(final(P, 5))
        drain(coord)
    elif state is SeqState.ERROR:
        with pytest.raises(ProtocolError):
            coord.receive(StepRequest(0, 0, P, (5,)))
    assert coord.sequences[0].state is state
    return coord


def event_of(event_type: type, coord: Coordinator):
    """An event of ``event_type`` for sequence 0 at its next position and current epoch."""
    s = coord.sequences[0]
    pos = len(s.tokens) + len(s.inflight)
    return {
        FinalPrediction: lambda: FinalPrediction(0, s.epoch, len(s.tokens), 5),
        EarlyPrediction: lambda: EarlyPrediction(0, s.epoch, pos, 5, 2, 0.9),
        StepRequest: lambda: StepRequest(0, s.epoch, pos, (5,)),
        Rollback: lambda: Rollback(0, s.epoch + 1, pos),
        SequenceFinished: lambda: SequenceFinished(0, "eos"),
        Verified: lambda: Verified(0, pos, (5,)),
        Activations: lambda: Activations(0, s.epoch, pos, 1, torch.zeros(1, 4)),
    }[event_type]()


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("state", list(SeqState), ids=lambda s: s.name)
def test_every_transition(state, event_type):
    coord = coord_in(state)
    event = event_of(event_type, coord)
    if event_type in LEGAL[state]:
        next_state, commands = legal_outcome(state, event)
        coord.receive(event)
        assert coord.sequences[0].state is next_state
        assert drain(coord) == commands
    else:
        with pytest.raises(ProtocolError) as exc:
            coord.receive(event)
        message = str(exc.value)
        assert state.name in message
        assert event_type.__name__ in message
        assert "sequence 0" in message
        assert coord.sequences[0].state is SeqState.ERROR


def test_event_without_a_sequence_is_a_protocol_error():
    coord = make()
    with pytest.raises(ProtocolError):
        coord.receive(Shutdown())


def test_error_state_is_sticky_and_reported_as_waiting():
    coord = coord_in(SeqState.ERROR)
    for event in (final(P, 5), early(P, 5)):
        with pytest.raises(ProtocolError, match="ERROR"):
            coord.receive(event)
        assert coord.sequences[0].state is SeqState.ERROR
    assert coord.next_action() is WAITING  # an errored sequence is never DONE


# --- protocol errors ------------------------------------------------------------------------


def test_unknown_sequence():
    coord = make()
    with pytest.raises(ProtocolError, match="unknown sequence 7"):
        coord.receive(final(P, 5, seq=7))
    assert coord.sequences[0].state is SeqState.PREFILL  # the known sequence is untouched


@pytest.mark.parametrize("pos", [P - 1, P + 1, 0])
def test_final_prediction_at_the_wrong_position(pos):
    coord = make()
    with pytest.raises(ProtocolError, match=f"position {pos}") as exc:
        coord.receive(final(pos, 5))
    assert "sequence 0" in str(exc.value) and "FinalPrediction" in str(exc.value)
    assert coord.sequences[0].state is SeqState.ERROR
    assert drain(coord) == []


def test_duplicate_final_prediction_is_a_wrong_position():
    coord = make()
    coord.receive(final(P, 5))
    drain(coord)
    with pytest.raises(ProtocolError):
        coord.receive(final(P, 5))
    assert coord.sequences[0].state is SeqState.ERROR


@pytest.mark.parametrize("event", [final(P, 5, epoch=1), early(P, 5, epoch=3)], ids=["final", "early"])
def test_future_epoch(event):
    coord = make(max_inflight=2)
    with pytest.raises(ProtocolError, match="future epoch") as exc:
        coord.receive(event)
    assert "sequence 0" in str(exc.value) and type(event).__name__ in str(exc.value)
    assert coord.sequences[0].state is SeqState.ERROR
    assert drain(coord) == []




@pytest.mark.parametrize(
    "event",
    [
        pytest.param(StepRequest(0, 0, P, (5,)), id="illegal-type"),
        pytest.param(final(P + 2, 5), id="wrong-position"),
        pytest.param(final(P, 5, epoch=1), id="future-epoch"),
    ],
)
def test_protocol_errors_name_the_state_before_the_event(event):
    coord = make()
    with pytest.raises(ProtocolError) as exc:
        coord.receive(event)
    assert "PREFILL" in str(exc.value)


def test_add_sequence_errors():
    coord = make()
    with pytest.raises(ProtocolError, match="sequence 0 already exists"):
        coord.add_sequence(0, [1], StopCriteria(4))
    with pytest.raises(ValueError, match="prompt is empty"):
        coord.add_sequence(1, [], StopCriteria(4))
    assert set(coord.sequences) == {0}


# --- plain decoding (no early exit) -----------------------------------------------------------


def test_add_sequence_sends_the_prompt_to_stage_0():
    coord = Coordinator()
    assert coord.next_action() is DONE  # nothing registered: nothing to do
    coord.add_sequence(0, list(PROMPT), StopCriteria(4))
    assert coord.sequences[0].state is SeqState.PREFILL
    assert coord.next_action() == StepRequest(0, 0, 0, PROMPT)
    assert coord.next_action() is WAITING


def test_final_prediction_verifies_and_starts_the_token():
    coord = make()
    coord.receive(final(P, 5))
    assert drain(coord) == [Verified(0, P, (5,)), StepRequest(0, 0, P, (5,))]
    coord.receive(final(P + 1, 6))
    assert drain(coord) == [Verified(0, P + 1, (6,)), StepRequest(0, 0, P + 1, (6,))]
    s = coord.sequences[0]
    assert s.state is SeqState.DECODING
    assert s.tokens == [*PROMPT, 5, 6] and s.generated == [5, 6]
    assert coord.next_action() is WAITING


def test_stop_on_eos():
    coord = make()
    coord.receive(final(P, 5))
    drain(coord)
    coord.receive(final(P + 1, EOS))
    assert drain(coord) == [Verified(0, P + 1, (EOS,)), SequenceFinished(0, "eos")]
    s = coord.sequences[0]
    assert s.state is SeqState.FINISHED and s.finish_reason == "eos"
    assert s.generated == [5, EOS]
    assert coord.next_action() is DONE


def test_stop_on_a_stop_string_spanning_tokens():
    pieces = {5: "an", 6: "sw", 7: "er:", 8: "x"}
    coord = make(stop=("answer:",), decode=lambda ids: "".join(pieces[i] for i in ids))
    for i, token in enumerate((5, 6)):
        coord.receive(final(P + i, token))
        assert drain(coord) == [Verified(0, P + i, (token,)), StepRequest(0, 0, P + i, (token,))]
    coord.receive(final(P + 2, 7))
    assert drain(coord) == [Verified(0, P + 2, (7,)), SequenceFinished(0, "stop")]
    assert coord.sequences[0].finish_reason == "stop"
    assert coord.next_action() is DONE


def test_stop_on_max_new_tokens():
    coord = make(max_new_tokens=2)
    coord.receive(final(P, 5))
    assert drain(coord) == [Verified(0, P, (5,)), StepRequest(0, 0, P, (5,))]
    coord.receive(final(P + 1, 6))
    assert drain(coord) == [Verified(0, P + 1, (6,)), SequenceFinished(0, "length")]
    assert coord.sequences[0].finish_reason == "length"
    assert coord.next_action() is DONE


def test_max_new_tokens_1_finishes_on_the_prompts_prediction():
    coord = make(max_new_tokens=1)
    coord.receive(final(P, 5))
    assert drain(coord) == [Verified(0, P, (5,)), SequenceFinished(0, "length")]
    assert coord.sequences[0].state is SeqState.FINISHED


@pytest.mark.parametrize(
    "event",
    [final(P + 1, 5), final(P + 9, 5), final(P + 1, 5, epoch=4), early(P + 1, 5), early(P + 1, 5, epoch=7)],
)
def test_events_for_a_finished_sequence_are_dropped(event):
    coord = make(max_new_tokens=1, max_inflight=2)
    coord.receive(final(P, 5))
    drain(coord)
    coord.receive(event)  # in-flight work draining after the end: no error
    assert drain(coord) == []
    s = coord.sequences[0]
    assert s.state is SeqState.FINISHED and s.generated == [5]
    assert coord.next_action() is DONE


def test_done_only_when_every_sequence_has_finished():
    coord = Coordinator()
    coord.add_sequence(0, [1, 2], StopCriteria(1))
    coord.add_sequence(1, [3], StopCriteria(2))
    assert drain(coord) == [StepRequest(0, 0, 0, (1, 2)), StepRequest(1, 0, 0, (3,))]
    coord.receive(final(2, 5, seq=0))
    assert drain(coord) == [Verified(0, 2, (5,)), SequenceFinished(0, "length")]
    assert coord.next_action() is WAITING  # sequence 1 is still decoding
    coord.receive(final(1, 6, seq=1))
    assert drain(coord) == [Verified(1, 1, (6,)), StepRequest(1, 0, 1, (6,))]
    coord.receive(final(2, 7, seq=1))
    assert drain(coord) == [Verified(1, 2, (7,)), SequenceFinished(1, "length")]
    assert coord.next_action() is DONE
    assert coord.sequences[0].generated == [5] and coord.sequences[1].generated == [6, 7]


# --- early exit ------------------------------------------------------------------------------


def test_early_prediction_ignored_when_early_exit_is_off():
    coord = make(max_inflight=0)
    coord.receive(early(P, 5))
    assert drain(coord) == []
    s = coord.sequences[0]
    assert s.inflight == [] and s.stats.early_emitted == 0
    assert s.state is SeqState.PREFILL


def test_early_prediction_at_the_next_free_position_starts_the_token():
    coord = make(max_inflight=2)
    coord.receive(early(P, 5, layer=2))
    assert drain(coord) == [StepRequest(0, 0, P, (5,))]  # started, not shown
    coord.receive(early(P + 1, 6, layer=4))
    assert drain(coord) == [StepRequest(0, 0, P + 1, (6,))]
    s = coord.sequences[0]
    assert s.inflight == [5, 6]
    assert s.tokens == list(PROMPT)  # nothing committed before verification
    assert s.state is SeqState.PREFILL
    assert s.stats.early_emitted == 2 and s.stats.early_by_layer == {2: 1, 4: 1}


def test_early_prediction_capped_at_max_inflight():
    coord = make(max_inflight=1)
    coord.receive(early(P, 5))
    assert drain(coord) == [StepRequest(0, 0, P, (5,))]
    coord.receive(early(P + 1, 6))
    assert drain(coord) == []
    assert coord.sequences[0].inflight == [5]
    assert coord.sequences[0].stats.early_emitted == 1


def test_requests_carry_the_contexts_guess_of_the_next_token():
    """With ``lookup``, each request carries the token that followed the latest earlier match of
    the sequence's last tokens, unverified ones included; a rollback drops them from the match."""
    coord = Coordinator(max_inflight=2, lookup=2)
    coord.add_sequence(0, [7, 8, 9, 7, 8], StopCriteria(8))
    assert coord.next_action() == StepRequest(0, 0, 0, (7, 8, 9, 7, 8), lookup=9)  # "7 8" was followed by 9
    coord.receive(early(5, 9))  # in flight: ... 7 8 9
    assert drain(coord) == [StepRequest(0, 0, 5, (9,), lookup=7)]  # "8 9" was followed by 7
    coord.receive(early(6, 4))  # in flight: 9 4, and "9 4" never occurred
    assert drain(coord) == [StepRequest(0, 0, 6, (4,))]
    coord.receive(final(5, 1))  # the 9 was wrong: roll back, start 1; "8 1" never occurred
    assert drain(coord)[-1] == StepRequest(0, 1, 5, (1,))
    coord.receive(final(6, 7, epoch=1))  # ... 8 1 7: "1 7" never occurred, a 1-token match is too short
    assert drain(coord)[-1] == StepRequest(0, 1, 6, (7,))
    coord.receive(final(7, 8, epoch=1))  # ... 1 7 8: "7 8" was followed by 9, then by 1 (the latest)
    assert drain(coord)[-1] == StepRequest(0, 1, 7, (8,), lookup=1)


def drafting(max_new_tokens: int = 8, max_inflight: int = 2, draft: int = 2) -> Coordinator:
    """Sequence 0 of prompt 7 8 9 7 (its first request handed out) under a 1-token lookup with drafts."""
    coord = Coordinator(max_inflight=max_inflight, lookup=1, draft=draft)
    coord.add_sequence(0, [7, 8, 9, 7], StopCriteria(max_new_tokens))
    first = coord.next_action()  # a prompt carries no drafts
    assert first == StepRequest(0, 0, 0, (7, 8, 9, 7), lookup=8 if max_inflight else -1)
    return coord


def test_decode_requests_carry_the_lookups_drafts_which_the_final_layer_verifies():
    """A decode request carries up to ``draft`` tokens of the lookup's continuation after its own,
    in flight at once; the final predictions of the same pass verify them one by one, and the one
    after the last drafts starts the next request."""
    coord = drafting()
    coord.receive(final(4, 8))  # 7 8 9 7 | 8: "8" was followed by 9, then "9" by 7
    assert drain(coord)[-1] == StepRequest(0, 0, 4, (8, 9, 7), drafts=2)  # no guess rides after drafts
    s = coord.sequences[0]
    assert s.inflight == [9, 7] and s.stats.lookup_emitted == s.stats.early_emitted == s.stats.drafted == 2
    coord.receive(final(5, 9))
    coord.receive(final(6, 7))
    assert [type(a) for a in drain(coord)] == [Verified, Verified]  # accepted: nothing new to start
    coord.receive(final(7, 8))  # past the drafts: committed, and the next request starts
    assert drain(coord)[-1] == StepRequest(0, 0, 7, (8, 9, 7), drafts=2)
    assert s.tokens == [7, 8, 9, 7, 8, 9, 7, 8] and s.stats.lookup_accepted == s.stats.accepted == 2


def test_a_wrong_draft_rolls_back_to_its_position():
    coord = drafting()
    coord.receive(final(4, 8))
    drain(coord)  # drafts 9 7 at positions 5, 6
    coord.receive(final(5, 9))
    coord.receive(final(6, 3))  # the 7 was wrong: keep positions < 6, start the 3 (never seen: no drafts)
    assert drain(coord)[-2:] == [Rollback(0, 1, 6), StepRequest(0, 1, 6, (3,))]
    coord.receive(final(7, 4))  # of the old epoch's pass: stale
    assert drain(coord) == [] and coord.sequences[0].tokens == [7, 8, 9, 7, 8, 9, 3]
    assert coord.sequences[0].stats.rollbacks == 1


def test_drafts_stop_at_the_length_limit():
    """A draft is a token the sequence could still output, like an early one."""
    coord = drafting(max_new_tokens=3, draft=3)
    coord.receive(final(4, 8))  # 1 token out, room for 2 more of the 3 drafts the lookup has
    assert drain(coord)[-1] == StepRequest(0, 0, 4, (8, 9, 7), drafts=2)
    coord = drafting(max_new_tokens=2)
    coord.receive(final(4, 8))
    assert drain(coord)[-1] == StepRequest(0, 0, 4, (8, 9), drafts=1)


def test_nothing_starts_early_on_drafts_and_a_head_token_gets_its_own():
    """An early token after a request's drafts stands on them (right far less often than a head):
    it is ignored. A head's token on a request without drafts starts its item, with drafts."""
    coord = drafting()
    coord.receive(final(4, 8))
    drain(coord)
    coord.receive(early(7, 8))  # after the drafts 9 7
    assert drain(coord) == [] and coord.sequences[0].inflight == [9, 7]
    coord = drafting()
    coord.receive(early(4, 8))  # the prompt's item exits at a head: 8 starts, with its drafts
    assert drain(coord) == [StepRequest(0, 0, 4, (8, 9, 7), drafts=2)]
    assert coord.sequences[0].inflight == [8, 9, 7]


def test_with_drafts_a_heads_guess_still_needs_a_match_of_lookup_tokens():
    """Drafts take any match; the guess a head sends on (only where no draft could go: the
    prompt's item, or at the length limit) keeps the shortest match ``lookup`` asks for."""
    coord = Coordinator(max_inflight=2, lookup=2, draft=3)
    coord.add_sequence(0, [7, 8, 9, 7], StopCriteria(8))
    assert coord.next_action().lookup == -1  # "7" was followed by 8: a match of 1 < 2
    coord = Coordinator(max_inflight=2, lookup=2, draft=3)
    coord.add_sequence(0, [7, 8, 9, 7, 8], StopCriteria(8))
    assert coord.next_action().lookup == 9  # "7 8" was followed by 9


@pytest.mark.parametrize("draft", [-1, 9])
def test_a_draft_outside_its_bounds_is_refused(draft):
    with pytest.raises(ValueError, match="draft is a number of tokens from 0"):
        Coordinator(lookup=1, draft=draft)


@pytest.mark.parametrize("sampling,mode", [(None, "off"), (SamplingParams(0.7, seed=1), "eager")])
def test_no_drafts_without_early_exit_or_when_sampling(sampling, mode):
    coord = Coordinator(max_inflight=2, lookup=1, draft=3)
    coord.add_sequence(0, [7, 8, 7], StopCriteria(8), early_exit=mode, sampling=sampling)
    drain(coord)
    coord.receive(final(3, 8))
    assert drain(coord)[-1].drafts == 0


def test_drafts_need_no_heads():
    """Without heads (``max_inflight`` 0) a greedy sequence still gets drafts, but no guess rides
    the request, since no head would send it on."""
    coord = drafting(max_inflight=0)
    coord.receive(final(4, 8))
    assert drain(coord)[-1] == StepRequest(0, 0, 4, (8, 9, 7), drafts=2)


@pytest.mark.parametrize("sampling,mode", [(None, "off"), (SamplingParams(0.7, seed=1), "eager")])
def test_no_guess_without_early_exit_or_when_sampling(sampling, mode):
    coord = Coordinator(max_inflight=2, lookup=1)
    coord.add_sequence(0, [7, 8, 7], StopCriteria(8), early_exit=mode, sampling=sampling)
    assert coord.next_action().lookup == -1


@pytest.mark.parametrize("lookup", [-1, 5])
def test_a_lookup_outside_the_matches_looked_up_is_refused(lookup):
    with pytest.raises(ValueError, match="lookup is a match length of 1 to 4"):
        Coordinator(lookup=lookup)


@pytest.mark.parametrize("pos", [P - 1, P + 1, P + 2, 0])
def test_early_prediction_not_at_the_next_free_position_is_ignored(pos):
    coord = make(max_inflight=4)
    coord.receive(early(pos, 5))
    assert drain(coord) == []
    s = coord.sequences[0]
    assert s.inflight == [] and s.state is SeqState.PREFILL  # ignored, not an error


def test_early_prediction_for_a_position_already_verified_is_ignored():
    coord = make(max_inflight=2)
    coord.receive(final(P, 5))  # the final layer beat the exit head
    drain(coord)
    coord.receive(early(P, 5))
    assert drain(coord) == []
    assert coord.sequences[0].inflight == []


def test_early_prediction_past_max_new_tokens_is_ignored():
    coord = make(max_new_tokens=2, max_inflight=4)
    coord.receive(final(P, 5))
    drain(coord)
    coord.receive(early(P + 1, 6))  # the second and last token: may be started
    assert drain(coord) == [StepRequest(0, 0, P + 1, (6,))]
    coord.receive(early(P + 2, 7))  # a third could never be output
    assert drain(coord) == []
    assert coord.sequences[0].inflight == [6]


def test_agreeing_final_prediction_accepts_the_inflight_token():
    coord = make(max_inflight=2)
    coord.receive(early(P, 5))
    drain(coord)
    coord.receive(final(P, 5))
    # already in the pipeline: shown, not started again
    assert drain(coord) == [Verified(0, P, (5,))]
    s = coord.sequences[0]
    assert s.generated == [5] and s.inflight == [] and s.epoch == 0
    assert s.state is SeqState.DECODING
    assert (s.stats.early_emitted, s.stats.accepted, s.stats.rollbacks) == (1, 1, 0)
    # the accepted token's own final prediction continues the sequence as usual
    coord.receive(final(P + 1, 6))
    assert drain(coord) == [Verified(0, P + 1, (6,)), StepRequest(0, 0, P + 1, (6,))]


def test_accepting_keeps_the_later_inflight_tokens():
    coord = make(max_inflight=2)
    coord.receive(early(P, 5))
    coord.receive(early(P + 1, 6))
    drain(coord)
    coord.receive(final(P, 5))
    assert drain(coord) == [Verified(0, P, (5,))]
    assert coord.sequences[0].inflight == [6]
    coord.receive(early(P + 2, 7))  # the next free position is after the in-flight token
    assert drain(coord) == [StepRequest(0, 0, P + 2, (7,))]
    coord.receive(final(P + 1, 6))
    assert drain(coord) == [Verified(0, P + 1, (6,))]
    assert coord.sequences[0].stats.accepted == 2


def test_disagreeing_final_prediction_rolls_back():
    coord = make(max_inflight=2)
    coord.receive(early(P, 5))
    coord.receive(early(P + 1, 6))
    drain(coord)
    coord.receive(final(P, 9))
    assert drain(coord) == [Verified(0, P, (9,)), Rollback(0, 1, P), StepRequest(0, 1, P, (9,))]
    s = coord.sequences[0]
    assert s.epoch == 1 and s.inflight == [] and s.generated == [9]
    assert s.state is SeqState.DECODING
    assert (s.stats.early_emitted, s.stats.accepted, s.stats.rollbacks) == (2, 0, 1)


def test_predictions_of_the_old_epoch_are_dropped_after_a_rollback():
    coord = make(max_inflight=2)
    coord.receive(early(P, 5))
    drain(coord)
    coord.receive(final(P, 9))
    drain(coord)
    # the rejected token's own predictions are still draining from the pipeline
    coord.receive(early(P + 1, 6, epoch=0))
    coord.receive(final(P + 1, 6, epoch=0))
    assert drain(coord) == []
    s = coord.sequences[0]
    assert s.generated == [9] and s.inflight == [] and s.epoch == 1
    # the new epoch goes on
    coord.receive(final(P + 1, 7, epoch=1))
    assert drain(coord) == [Verified(0, P + 1, (7,)), StepRequest(0, 1, P + 1, (7,))]


def test_rollback_whose_corrected_token_ends_the_sequence():
    coord = make(max_inflight=2)
    coord.receive(early(P, 5))
    drain(coord)
    coord.receive(final(P, EOS))
    assert drain(coord) == [Verified(0, P, (EOS,)), Rollback(0, 1, P), SequenceFinished(0, "eos")]
    assert coord.next_action() is DONE


def test_accepted_token_that_reaches_max_new_tokens_finishes():
    coord = make(max_new_tokens=1, max_inflight=2)
    coord.receive(early(P, 5))
    drain(coord)
    coord.receive(final(P, 5))
    assert drain(coord) == [Verified(0, P, (5,)), SequenceFinished(0, "length")]
    assert coord.sequences[0].inflight == []
    assert coord.next_action() is DONE


def test_early_eos_only_finishes_once_verified():
    coord = make(max_inflight=2)
    coord.receive(early(P, EOS))
    assert drain(coord) == [StepRequest(0, 0, P, (EOS,))]  # no Verified, no SequenceFinished
    s = coord.sequences[0]
    assert s.state is SeqState.PREFILL and s.generated == []
    assert coord.next_action() is WAITING
    coord.receive(final(P, EOS))
    assert drain(coord) == [Verified(0, P, (EOS,)), SequenceFinished(0, "eos")]
    assert s.state is SeqState.FINISHED and s.finish_reason == "eos"
    assert coord.next_action() is DONE


def test_rejected_early_eos_does_not_finish():
    coord = make(max_inflight=2)
    coord.receive(early(P, EOS))
    drain(coord)
    coord.receive(final(P, 5))
    assert drain(coord) == [Verified(0, P, (5,)), Rollback(0, 1, P), StepRequest(0, 1, P, (5,))]
    assert coord.sequences[0].state is SeqState.DECODING


def test_early_stop_string_only_finishes_once_verified():
    pieces = {5: "ST", 6: "OP", 7: "x"}
    coord = make(max_inflight=2, stop=("STOP",), decode=lambda ids: "".join(pieces[i] for i in ids))
    coord.receive(final(P, 5))
    drain(coord)
    coord.receive(early(P + 1, 6))
    assert drain(coord) == [StepRequest(0, 0, P + 1, (6,))]
    assert coord.sequences[0].state is SeqState.DECODING
    coord.receive(final(P + 1, 6))
    assert drain(coord) == [Verified(0, P + 1, (6,)), SequenceFinished(0, "stop")]


def test_stats_counters():
    coord = make(max_new_tokens=16, max_inflight=1)
    pos = P
    coord.receive(final(pos, 5))
    drain(coord)
    pos += 1
    # accept, accept, reject, accept
    for guess, truth in [(6, 6), (7, 7), (8, 3), (4, 4)]:
        coord.receive(early(pos, guess, epoch=coord.sequences[0].epoch, layer=guess % 2))
        drain(coord)
        coord.receive(final(pos, truth, epoch=coord.sequences[0].epoch))
        drain(coord)
        pos += 1
    s = coord.sequences[0]
    assert (s.stats.early_emitted, s.stats.accepted, s.stats.rollbacks) == (4, 3, 1)
    assert s.stats.early_by_layer == {0: 3, 1: 1}
    assert s.epoch == 1
    assert s.generated == [5, 6, 7, 3, 4]


# --- invariant: whatever the early heads guess, the output is greedy's -----------------------


def _truth(prefix: tuple[int, ...]) -> int:
    """The fake model's greedy next token: a deterministic function of the whole prefix."""
    return (sum((i + 1) * t for i, t in enumerate(prefix)) * 31 + 7) % 17 + 3  # never EOS (2)


class FakePipeline:
    """Answers StepRequests like a pipeline would, with early guesses that are often wrong.

    Each started token yields maybe an EarlyPrediction at once and a FinalPrediction
    ``latency`` ticks later, computed from the tokens the pipeline holds for that epoch.
    """

    def __init__(self, rng: random.Random, latency: int, eos_at: int | None):
        self.rng, self.latency, self.eos_at = rng, latency, eos_at
        self.held: list[int] = []
        self.epoch = 0
        self.pending: list[tuple[int, object]] = []  # (due tick, event)

    def truth(self, prefix: tuple[int, ...]) -> int:
        return EOS if self.eos_at is not None and len(prefix) == self.eos_at else _truth(prefix)

    def start(self, req: StepRequest, tick: int) -> None:
        if req.epoch > self.epoch:
            self.epoch = req.epoch
            del self.held[req.pos :]
        assert req.pos == len(self.held)
        self.held.extend(req.tokens)
        prefix = tuple(self.held)
        pos = len(prefix)
        token = self.truth(prefix)
        if self.rng.random() < 0.8:
            guess = token if self.rng.random() < 0.7 else self.rng.choice([EOS, 3, 4, 5])
            self.pending.append((tick + 1, EarlyPrediction(req.seq, req.epoch, pos, guess, 1, 0.9)))
        self.pending.append((tick + self.latency, FinalPrediction(req.seq, req.epoch, pos, token)))

    def rollback(self, rb: Rollback) -> None:
        if rb.epoch > self.epoch:
            self.epoch = rb.epoch
            del self.held[rb.keep_len :]

    def due(self, tick: int) -> list:
        ready = [e for t, e in self.pending if t <= tick]
        self.pending = [(t, e) for t, e in self.pending if t > tick]
        return ready


@pytest.mark.parametrize("seed", range(12))
def test_output_is_greedy_whatever_the_early_heads_guess(seed):
    rng = random.Random(seed)
    max_new = rng.randint(1, 24)
    eos_at = rng.choice([None, P + rng.randint(1, 20)])
    coord = Coordinator(max_inflight=rng.randint(0, 4))
    coord.add_sequence(0, list(PROMPT), StopCriteria(max_new, frozenset({EOS})))
    pipe = FakePipeline(rng, latency=rng.randint(1, 4), eos_at=eos_at)
    finals_seen: dict[int, int] = {}
    shown: list[int] = []
    for tick in range(1000):
        action = coord.next_action()
        while action is not WAITING and action is not DONE:
            if isinstance(action, StepRequest):
                pipe.start(action, tick)
            elif isinstance(action, Rollback):
                pipe.rollback(action)
            elif isinstance(action, Verified):
                # invariant 3: nothing is shown before its FinalPrediction arrived
                for i, token in enumerate(action.tokens):
                    assert finals_seen.get(action.pos + i) == token
                assert action.pos == P + len(shown)
                shown.extend(action.tokens)
            else:
                assert isinstance(action, SequenceFinished)
            action = coord.next_action()
        if action is DONE:
            break
        for event in pipe.due(tick):
            s = coord.sequences[0]
            if isinstance(event, FinalPrediction) and event.epoch == s.epoch and s.state is not SeqState.FINISHED:
                finals_seen[event.pos] = event.token
            coord.receive(event)
    else:
        pytest.fail("the coordinator never finished")

    expected = []
    while len(expected) < max_new:
        token = pipe.truth((*PROMPT, *expected))
        expected.append(token)
        if token == EOS:
            break
    s = coord.sequences[0]
    assert shown == expected == s.generated
    assert s.stats.accepted + s.stats.rollbacks <= s.stats.early_emitted
    assert s.epoch == s.stats.rollbacks


# --- the sequence's early-exit mode, and its end in every case -------------------------------------


def test_every_step_request_carries_the_sequences_mode():
    coord = Coordinator(max_inflight=2)
    coord.add_sequence(0, list(PROMPT), StopCriteria(8), early_exit="deferred")
    coord.add_sequence(1, [7], StopCriteria(8), early_exit="off")
    assert drain(coord) == [StepRequest(0, 0, 0, PROMPT, "deferred"), StepRequest(1, 0, 0, (7,), "off")]
    coord.receive(final(P, 5))
    coord.receive(early(P + 1, 6))
    coord.receive(final(P + 1, 9))  # rejects 6: rollback, and the corrected token goes out in the mode
    assert drain(coord) == [
        Verified(0, P, (5,)), StepRequest(0, 0, P, (5,), "deferred"), StepRequest(0, 0, P + 1, (6,), "deferred"),
        Verified(0, P + 1, (9,)), Rollback(0, 1, P + 1), StepRequest(0, 1, P + 1, (9,), "deferred"),
    ]
    # `off` takes no early token, whatever the Coordinator's max_inflight
    coord.receive(final(1, 3, seq=1))
    coord.receive(early(2, 4, seq=1))
    assert drain(coord) == [Verified(1, 1, (3,)), StepRequest(1, 0, 1, (3,), "off")]
    assert coord.sequences[1].stats.early_emitted == 0


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="early_exit `fast` is unknown"):
        Coordinator().add_sequence(0, [1], StopCriteria(4), early_exit="fast")


def test_cancel_ends_a_sequence_with_one_sequence_finished():
    coord = make(max_inflight=2)
    coord.receive(final(P, 5))
    coord.receive(early(P + 1, 6))  # queued commands of the sequence, not handed out yet
    coord.cancel(0, "failed")
    assert drain(coord) == [SequenceFinished(0, "failed")]
    s = coord.sequences[0]
    assert (s.state, s.finish_reason, s.inflight) == (SeqState.FINISHED, "failed", [])
    coord.cancel(0, "cancelled")  # already finished: nothing more
    coord.receive(final(P + 1, 6))  # work still draining is dropped as for any finished sequence
    assert drain(coord) == [] and coord.next_action() is DONE


def test_cancel_after_a_protocol_error_still_frees_the_slot():
    coord = make()
    with pytest.raises(ProtocolError):
        coord.receive(final(P + 3, 5))
    coord.cancel(0, "failed")
    assert drain(coord) == [SequenceFinished(0, "failed")]
    assert coord.sequences[0].state is SeqState.ERROR  # what went wrong stays visible


def test_stop_strings_decode_each_verified_token_once():
    """Stop strings are checked incrementally: the decoding work per token does not grow
    with the output (it was the whole output, twice, per token: quadratic)."""
    decoded = []

    def decode(ids):
        decoded.append(len(ids))
        return "".join(chr(97 + i % 26) for i in ids)

    n = 400
    coord = make(max_new_tokens=n, eos=(), stop=("zzz",), decode=decode)
    for i in range(n):
        coord.receive(final(P + i, i % 25))
        drain(coord)
    assert coord.sequences[0].finish_reason == "length"
    assert max(decoded) <= 4 and sum(decoded) <= 4 * n
