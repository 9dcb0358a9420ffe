"""A run that fails frees its slots: whatever raises inside ``Engine.generate`` (the caller's
``on_text``, an interrupt, the model), every stage releases the sequence before the error goes
on, and the next generation runs on the same slots. Also: the one ``ActionRouter`` both
runners use, and sequences of different early-exit modes sharing one pipeline at once.

In process, on a tiny random model; the same on two ranks is in tests/test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from adadecode.runtime.coordinator import Coordinator
from adadecode.runtime.engine import Engine
from adadecode.runtime.events import (
    DONE,
    WAITING,
    EarlyPrediction,
    FinalPrediction,
    ProtocolError,
    Rollback,
    SequenceFinished,
    StepRequest,
    Verified,
)
from adadecode.runtime.runners.inprocess import LocalRunner
from adadecode.runtime.runners.routing import ActionRouter
from adadecode.runtime.stopping import StopCriteria
from adadecode.runtime.transport.errors import TransportError
from helpers import build_stages, make_engine

PROMPT = [5, 17, 3, 42, 8, 11]
MAX_NEW = 16
THREE = [(0, 2), (2, 4), (4, 6)]
TINY_MODEL_SEED = 3  # the weights of conftest.model_dir


@pytest.fixture(scope="module")
def reference(model_dir) -> list[int]:
    return make_engine(model_dir, [(0, 6)]).generate(PROMPT, max_new_tokens=MAX_NEW).tokens


def assert_all_free(engine: Engine, seqs: int) -> None:
    for stage in engine.stages:
        assert stage.slots == {} and stage.epochs == {} and not stage.queued and not stage.parked, stage.index
        assert stage.finished.floor == seqs and len(stage.finished) == 0


def failing_on_text(after: int, exc: BaseException):
    seen = []

    def on_text(text: str) -> None:
        seen.append(text)
        if len(seen) == after:
            raise exc

    return on_text


@pytest.mark.parametrize(
    "ranges, mode, exc",
    [
        ([(0, 6)], "eager", RuntimeError("the caller's callback failed")),
        ([(0, 6)], "off", KeyboardInterrupt()),
        (THREE, "deferred", KeyboardInterrupt()),
        (THREE, "eager", ValueError("the caller's callback failed")),
    ],
    ids=["1-stage-error", "1-stage-interrupt", "3-stages-interrupt", "3-stages-error"],
)
def test_an_error_in_on_text_frees_the_slot_on_every_stage(model_dir, reference, ranges, mode, exc):
    engine = make_engine(model_dir, ranges)
    with pytest.raises(type(exc)):
        engine.generate(PROMPT, max_new_tokens=MAX_NEW, early_exit=mode, on_text=failing_on_text(3, exc))
    assert_all_free(engine, 1)
    for i, again in enumerate((mode, "deferred" if mode != "deferred" else "off")):  # one slot each: a leak raises
        assert engine.generate(PROMPT, max_new_tokens=MAX_NEW, early_exit=again).tokens == reference
        assert_all_free(engine, 2 + i)


def test_a_model_error_mid_run_frees_the_slot_on_every_stage(model_dir, reference):
    """A torch error in stage 1's layers, with early tokens in flight on every stage."""
    engine = make_engine(model_dir, THREE)
    model = engine.stages[1].model
    real, calls = model.run_layers, []

    def run_layers(*args):
        calls.append(args)
        if len(calls) == 4:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args)

    model.run_layers = run_layers
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.generate(PROMPT, max_new_tokens=MAX_NEW, early_exit="eager")
    assert_all_free(engine, 1)
    assert engine.generate(PROMPT, max_new_tokens=MAX_NEW, early_exit="eager").tokens == reference


def test_sequences_of_different_modes_share_the_pipeline_at_once(model_dir, reference):
    """Three sequences, one per mode, in one Coordinator on three stages: each gets the reference
    tokens, and only the early-exit ones emitted early tokens. No stage setting was touched."""
    stages = build_stages(model_dir, THREE, num_slots=3)
    coord = Coordinator(max_inflight=2)
    for seq, mode in enumerate(("eager", "off", "deferred")):
        coord.add_sequence(seq, PROMPT, StopCriteria(MAX_NEW), early_exit=mode)
    LocalRunner(stages).run(coord)
    assert [coord.sequences[seq].generated for seq in range(3)] == [reference] * 3
    assert [coord.sequences[seq].stats.early_emitted > 0 for seq in range(3)] == [True, False, True]
    assert all(stage.policy == "off" and stage.slots == {} for stage in stages)
    assert sum(stage.stats.merged for stage in stages) > 0  # the deferred sequence merged backfills


# --- the router ----------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.first, self.every = [], []

    def router(self) -> ActionRouter:
        return ActionRouter(self.first.append, self.every.append)


def test_both_runners_route_through_the_one_router(model_dir):
    from adadecode.runtime.runners import distributed, inprocess

    assert isinstance(LocalRunner(build_stages(model_dir, [(0, 6)])).router, ActionRouter)
    assert inprocess.ActionRouter is distributed.ActionRouter is ActionRouter


def test_the_router_sends_each_command_where_it_goes():
    rec, shown = Recorder(), []
    coord = Coordinator(max_inflight=2)
    coord.add_sequence(0, [1, 2], StopCriteria(2))
    router = rec.router()
    assert router.pump(coord, shown.append) is WAITING
    coord.receive(FinalPrediction(0, 0, 2, 7))
    coord.receive(EarlyPrediction(0, 0, 3, 8, 2, 0.9))
    coord.receive(FinalPrediction(0, 0, 3, 9))
    assert router.pump(coord, shown.append) is DONE
    assert rec.first == [StepRequest(0, 0, 0, (1, 2)), StepRequest(0, 0, 2, (7,)), StepRequest(0, 0, 3, (8,))]
    assert rec.every == [Rollback(0, 1, 3), SequenceFinished(0, "length")]
    assert shown == [Verified(0, 2, (7,)), Verified(0, 3, (9,))]


def test_release_ends_every_sequence_and_notes_what_failed():
    rec = Recorder()
    coord = Coordinator()
    coord.add_sequence(0, [1], StopCriteria(1))
    coord.add_sequence(1, [2], StopCriteria(4))
    router = rec.router()
    router.pump(coord)
    coord.receive(FinalPrediction(0, 0, 1, 5))
    # sequence 0 finished, its SequenceFinished still queued, sequence 1 running: a failure now
    exc = KeyboardInterrupt()
    router.release(coord, exc)
    assert rec.every == [SequenceFinished(0, "length"), SequenceFinished(1, "cancelled")]
    assert coord.next_action() is DONE

    def broken(event):
        raise ProtocolError("stage 2 is shut down")

    exc = RuntimeError("first")
    ActionRouter(rec.first.append, broken).release(coord, exc)
    assert "freeing the cache slots of sequence 0 failed too: ProtocolError" in exc.__notes__[0]


# --- rank 0 of a pipeline, over a scripted transport (no processes) --------------------------------


class ScriptedRank1:
    """Rank 0's transport, with rank 1 played by a script: ``replies`` maps what rank 0 sends
    (an Activations' (epoch, pos), or a broadcast event's class name) to the control messages
    rank 1 answers with."""

    heartbeat_s = 0.01

    def __init__(self, replies: dict, timeout_s: float = 5.0):
        self.replies, self.timeout_s = replies, timeout_s
        self.inbox = [(1, "stage", {"start": 3, "end": 6, "heads": None})]
        self.sent, self.broadcasts, self.busy_since = [], [], None

    # the data plane
    def send(self, act) -> None:
        self.sent.append((act.epoch, act.pos))
        self.inbox += self.replies.pop((act.epoch, act.pos), [])

    # the control plane
    def recv(self, timeout_s: float = 0.0) -> list:
        out, self.inbox = self.inbox, []
        return out

    def broadcast(self, kind: str, body) -> None:
        self.broadcasts.append(body[0])
        self.inbox += self.replies.get(body[0], [])

    def busy_for(self, rank: int) -> float:
        return 0.0


def rank0(model_dir, script: ScriptedRank1):
    from adadecode.runtime.runners.distributed import DistributedRunner
    from adadecode.runtime.transport import Transport

    stage = build_stages(model_dir, [(0, 3), (3, 6)])[0]
    stage.heads = None  # early tokens come from rank 1's heads only: the script decides them
    return DistributedRunner(stage, Transport(0, 2, script, script, torch.device("cpu"), ["a", "b"]))


def ev(event) -> tuple:
    from adadecode.runtime.transport.control import encode_event

    return (1, "ev", encode_event(event))


def test_rank0_drops_activations_its_own_step_made_stale(model_dir):
    """Rank 1 rejects the early token 8 while stage 0 computes it: the rollback reaches stage 0
    before the send, and those activations are dropped instead of shipped to be dropped."""
    P = len(PROMPT)
    rejection = [ev(FinalPrediction(0, 0, P + 1, 9))]
    script = ScriptedRank1({
        (0, 0): [ev(FinalPrediction(0, 0, P, 7)), ev(EarlyPrediction(0, 0, P + 1, 8, 4, 0.9))],
        (1, P + 1): [ev(FinalPrediction(0, 1, P + 2, 4))],
        "SequenceFinished": [(1, "released", [0, 1.5])],
    })
    runner = rank0(model_dir, script)
    step = runner.stage.next_action

    def next_action():  # the rejection comes in while stage 0 computes the early token
        out = step()
        if (getattr(out, "epoch", None), getattr(out, "pos", None)) == (0, P + 1):
            script.inbox += rejection
        return out

    runner.stage.next_action = next_action
    coord = Coordinator(max_inflight=2)
    coord.add_sequence(0, PROMPT, StopCriteria(3), early_exit="eager")
    runner.run(coord)
    assert coord.sequences[0].generated == [7, 9, 4]
    assert script.sent == [(0, 0), (0, P), (1, P + 1)]  # not (0, P + 1): stale before it left
    assert runner.unsent == 1
    assert runner.busy_s[1] == 1.5 and runner._unreleased == {}


def test_rank0_returns_only_once_every_rank_released_the_slots(model_dir):
    """The release is explicit: without rank 1's answer a run does not end (here: it times
    out, naming the sequence and the rank) and the runner refuses to run again."""
    script = ScriptedRank1({(0, 0): [ev(FinalPrediction(0, 0, len(PROMPT), 7))]})
    runner = rank0(model_dir, script)
    runner.timeout_s = 0.3
    coord = Coordinator()
    coord.add_sequence(0, PROMPT, StopCriteria(1))
    with pytest.raises(TransportError, match=r"freeing the cache slots of sequences \{0: \[1\]\}"):
        runner.run(coord)
    assert script.broadcasts == ["SequenceFinished"]
    coord = Coordinator()
    coord.add_sequence(1, PROMPT, StopCriteria(1))
    with pytest.raises(TransportError, match="cannot run again.*may still be taken"):
        runner.run(coord)


@pytest.mark.parametrize("exc", [RuntimeError("on_text failed"), KeyboardInterrupt()])
def test_rank0_frees_every_ranks_slot_when_a_run_fails(model_dir, exc):
    P = len(PROMPT)
    script = ScriptedRank1({
        (0, 0): [ev(FinalPrediction(0, 0, P, 7))],
        (0, P): [ev(FinalPrediction(0, 0, P + 1, 8))],
        "SequenceFinished": [ev(FinalPrediction(0, 0, P + 2, 9)), (1, "released", [0, 0.5])],  # late work, then
    })
    runner = rank0(model_dir, script)
    coord = Coordinator()
    coord.add_sequence(0, PROMPT, StopCriteria(8))

    def on_verified(event):
        if event.pos == P + 1:
            raise exc

    with pytest.raises(type(exc)):
        runner.run(coord, on_verified)
    assert script.broadcasts == ["SequenceFinished"] and coord.sequences[0].finish_reason in ("failed", "cancelled")
    assert runner.stage.slots == {} and runner._unreleased == {} and runner._broken is None
    # the next run has the slots (and the late prediction of the failed one was dropped)
    script.replies.update({(0, 0): [ev(FinalPrediction(1, 0, P, 7))], "SequenceFinished": [(1, "released", [1, 0.7])]})
    coord = Coordinator()
    coord.add_sequence(1, PROMPT, StopCriteria(1))
    runner.run(coord)
    assert coord.sequences[1].generated == [7] and runner.busy_s[1] == 0.7


def test_a_step_past_the_step_timeout_is_a_hang(model_dir):
    """Heartbeats have their own thread, so a long step is computing, not a hang: up to
    ``step_timeout_s``; past it (a wedged kernel or collective) the run stops and says why."""
    script = ScriptedRank1({})  # rank 1 never answers: it is inside one very long step
    script.busy_for = lambda rank: 12.0
    script.describe = lambda rank: f"rank {rank} (pid 42 on b)"
    runner = rank0(model_dir, script)
    runner.timeout_s, runner.step_timeout_s = 0.2, 10.0
    coord = Coordinator()
    coord.add_sequence(0, PROMPT, StopCriteria(1))
    with pytest.raises(TransportError, match=r"rank 1 \(pid 42 on b\) has been inside one stage step for 12 s"):
        runner.run(coord)
