"""Randomised pipelines: Stages and a Coordinator over the fake model, wired by a delivery
layer that reorders whatever the transport may reorder, with exit heads that are confident
and often wrong.

The transport's guarantees (docs/design.md, Runners and transports) are all the harness keeps:

- the data plane between two neighbouring stages is FIFO;
- control from the coordinator to one stage (StepRequest, Rollback, SequenceFinished) is FIFO;
- predictions from one stage to the coordinator are FIFO;
- everything else interleaves arbitrarily, and a stage runs whenever it holds work (so
  deferred work may run idle before the next token's StepRequest is delivered).

Every run must give plain greedy decoding of the fake model, and every stage's cache must
hold, at every layer, a prefill of the tokens the coordinator started in the epoch the stage
is in: checked after every step a stage takes, and at the end, where it covers every
committed token but the last (which no stage ever needs). The fake model's layers hash
everything they cached, so a stale or missing entry also changes later tokens.

Deterministic: every choice comes from a ``random.Random`` seeded with the run's number.
A failure names the run; ``run_pipeline(seed, num_stages, policy, trace=True)`` replays it.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, deque
from dataclasses import dataclass, field

import pytest
from adadecode.runtime.coordinator import Coordinator
from adadecode.runtime.draft_table import DraftTable
from adadecode.runtime.events import (
    DONE,
    WAITING,
    Activations,
    EarlyPrediction,
    FinalPrediction,
    Rollback,
    SequenceFinished,
    StepRequest,
    Verified,
)
from adadecode.runtime.stage import Stage, StageState
from adadecode.runtime.stopping import StopCriteria
from fakes import VOCAB, FakeHeads, FakeStageModel, greedy, head_oracle, mix, prefill

RUNS = 500  # per (stages, policy): 3000 runs in all
MAX_MOVES = 5000  # a run takes a few hundred; more means a livelock


@dataclass
class Run:
    """One randomised configuration and what it must produce."""

    seed: int
    num_stages: int
    policy: str
    ranges: list[tuple[int, int]]
    head_layers: list[int]
    max_inflight: int
    early_exit_below: int | None  # the Coordinator's load rule (serving): heads only below this many sequences
    p_wrong: float
    lookup: int  # the Coordinator's context lookup (0: off): guesses from the sequence's own tokens
    draft: int  # with lookup, the Coordinator's drafts per decode request (0: none)
    table: bool  # with drafts, a draft table (greedy answers and noise) where a sequence has no match
    weights: dict[tuple[str, int], float]
    sequences: dict[int, tuple[tuple[int, ...], StopCriteria, list[int]]]  # seq -> prompt, criteria, greedy
    num_layers: int = field(init=False)

    def __post_init__(self):
        self.num_layers = self.ranges[-1][1]

    def __str__(self):
        seqs = {s: (list(p), c.max_new_tokens, sorted(c.eos_token_ids)) for s, (p, c, _) in self.sequences.items()}
        return (
            f"run {self.seed} ({self.num_stages} stages, {self.policy}): layers {self.ranges}, heads at "
            f"{self.head_layers}, max_inflight {self.max_inflight}, early_exit_below {self.early_exit_below}, "
            f"p_wrong {self.p_wrong}, lookup {self.lookup}, draft {self.draft}, table {self.table}, "
            f"weights {self.weights}, "
            f"sequences {seqs}"
        )


def draw(seed: int, num_stages: int, policy: str) -> Run:
    rng = random.Random(f"{num_stages}/{policy}/{seed}")  # str seeds are stable across processes
    num_layers = rng.randint(max(2, num_stages), num_stages + 3)
    cuts = sorted(rng.sample(range(1, num_layers), num_stages - 1))
    bounds = [0, *cuts, num_layers]
    sequences = {}
    for seq in range(rng.choice((1, 1, 2))):
        prompt = tuple(rng.randrange(VOCAB) for _ in range(rng.randint(1, 4)))
        max_new = rng.choice((1, rng.randint(2, 6), rng.randint(7, 14)))
        ref = greedy(prompt, max_new, num_layers)
        eos = frozenset()
        if rng.random() < 0.5:  # stop at the first occurrence of a token greedy really produces
            eos = frozenset({ref[rng.randrange(len(ref))]})
            ref = ref[: next(i for i, t in enumerate(ref) if t in eos) + 1]
        sequences[seq] = (prompt, StopCriteria(max_new, eos), ref)
    return Run(
        seed=seed,
        num_stages=num_stages,
        policy=policy,
        ranges=list(itertools.pairwise(bounds)),
        head_layers=sorted(rng.sample(range(1, num_layers), rng.randint(1, min(3, num_layers - 1)))),
        max_inflight=rng.randint(1, 3),
        # with 2 sequences, 2 switches heads off while both run and on again when one ends
        early_exit_below=rng.choice((None, None, None, 2)),
        p_wrong=rng.choice((0.0, 0.3, 0.6, 1.0)),
        lookup=random.Random(f"lookup/{num_stages}/{policy}/{seed}").choice((0, 0, 1, 2)),  # the draws above as before
        draft=random.Random(f"draft/{num_stages}/{policy}/{seed}").choice((0, 0, 1, 3)),
        table=random.Random(f"table/{num_stages}/{policy}/{seed}").random() < 0.5,
        # how eagerly each channel delivers and each stage computes: lopsided weights make
        # the rare orders common (a late Rollback on one stage, a stage that lags, ...)
        weights={
            (kind, i): rng.choice((0.1, 1.0, 10.0))
            for kind in ("control", "data", "predictions", "compute")
            for i in range(num_stages)
        },
        sequences=sequences,
    )


def random_heads(run: Run) -> FakeHeads:
    """Heads that peek at greedy's answer and then, ``p_wrong`` of the time, lie (confidently).

    Confidence and lies are hashes of (run, layer, hidden value), so a head is deterministic;
    off the greedy path (after a wrong token) it guesses."""
    oracle = {}
    for prompt, _, ref in run.sequences.values():
        oracle.update(head_oracle((*prompt, *ref), run.num_layers))
    eos = sorted(set().union(*(c.eos_token_ids for _, c, _ in run.sequences.values())))
    salt = mix(run.seed, run.num_stages, len(run.policy))

    def rule(layer: int, pos: int, value: int) -> tuple[int, float]:
        h = mix(salt, layer, value)
        confidence = (h & 0xFFFF) / 0x10000
        truth = oracle.get((layer, value))
        if truth is None:
            return (h >> 16) % VOCAB, confidence
        if ((h >> 32) & 0xFFFF) / 0x10000 >= run.p_wrong:
            return truth, confidence
        if eos and eos[0] != truth and (h >> 48) & 1:
            return eos[0], confidence  # an early EOS that must not end the sequence
        return (truth + 1 + (h >> 16) % (VOCAB - 1)) % VOCAB, confidence

    thresholds = {l: random.Random(mix(salt, l)).choice((0.0, 0.3, 0.7)) for l in run.head_layers}
    return FakeHeads(run.head_layers, rule, thresholds)


class ReferenceCaches:
    """What a prefill of ``tokens`` leaves at each layer (memoised: runs revisit prefixes)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self._memo: dict[tuple[int, ...], list[list[int]]] = {}

    def __call__(self, tokens) -> list[list[int]]:
        tokens = tuple(tokens)
        if tokens not in self._memo:
            model = prefill(tokens, self.num_layers)
            self._memo[tokens] = [model.entries(layer, 0) for layer in range(self.num_layers)]
        return self._memo[tokens]


def draft_table(run: Run) -> DraftTable | None:
    """For ``run.table``: the sequences' own greedy answers, which the table drafts right, and random
    ones, which it drafts wrong."""
    if not run.table:
        return None
    rng = random.Random(f"table tokens/{run.num_stages}/{run.policy}/{run.seed}")
    answers = [[*prompt, *ref] for prompt, _, ref in run.sequences.values()]
    answers += [[rng.randrange(VOCAB) for _ in range(8)] for _ in range(4)]
    return DraftTable.build(answers)


def run_pipeline(seed: int, num_stages: int, policy: str, trace: bool = False) -> Counter:
    """One run; returns counters of what it exercised. Raises AssertionError naming the run."""
    run = draw(seed, num_stages, policy)
    rng = random.Random(f"moves/{num_stages}/{policy}/{seed}")
    heads = random_heads(run)
    stages = [
        Stage(i, num_stages, FakeStageModel(a, b, run.num_layers, num_slots=len(run.sequences)), heads, policy)
        for i, (a, b) in enumerate(run.ranges)
    ]
    coord = Coordinator(max_inflight=run.max_inflight, early_exit_below=run.early_exit_below, lookup=run.lookup,
                        draft=run.draft, table=draft_table(run))
    control = [deque() for _ in stages]  # coordinator -> stage i
    data = [deque() for _ in stages[1:]]  # stage i -> stage i + 1
    predictions = [deque() for _ in stages]  # stage i -> coordinator
    busy = [False] * num_stages
    # seq -> epoch -> the tokens the coordinator has started in that epoch (prompt included)
    started = {seq: {0: []} for seq in run.sequences}
    shown = {seq: [] for seq in run.sequences}
    modes: dict[int, str | None] = {}  # seq -> early-exit mode of its last item (the load rule)
    reference = ReferenceCaches(run.num_layers)
    seen = Counter()
    log: list[str] = []

    def fail(message: str):
        moves = "last moves:\n" + "\n".join(log[-40:]) if trace else "(replay with trace=True for the moves)"
        raise AssertionError(f"{run}\n{message}\n{moves}")

    def pump() -> object:
        while (action := coord.next_action()) is not WAITING and action is not DONE:
            if trace:
                log.append(f"  coordinator -> {action}")
            if isinstance(action, StepRequest):
                tokens = started[action.seq][action.epoch]  # a new epoch's Rollback came first
                if action.pos != len(tokens):
                    fail(f"{action} does not continue the tokens started in its epoch, {tokens}")
                tokens.extend(action.tokens)
                control[0].append(action)
                if run.early_exit_below is not None and action.pos > 0:  # the load rule at work
                    last_mode = modes.get(action.seq)
                    modes[action.seq] = action.early_exit
                    if last_mode is not None and last_mode != action.early_exit:
                        seen["heads off under load" if action.early_exit == "off" else "heads on again"] += 1
            elif isinstance(action, Rollback):
                started[action.seq][action.epoch] = started[action.seq][action.epoch - 1][: action.keep_len]
                for queue in control:
                    queue.append(action)
            elif isinstance(action, SequenceFinished):
                seen[action.reason] += 1
                for queue in control:
                    queue.append(action)
            elif isinstance(action, Verified):
                prompt = run.sequences[action.seq][0]
                if action.pos != len(prompt) + len(shown[action.seq]):
                    fail(f"Verified out of order: {action}")
                shown[action.seq].extend(action.tokens)
            else:
                fail(f"the coordinator produced {action}")
        return action

    def check_final_caches(i: int, seq: int) -> None:
        """At its end, stage ``i`` holds a prefill of every committed token of ``seq`` but the last.

        Checked as SequenceFinished reaches the stage, before its slot is freed (and maybe reused):
        the sequence's last Rollback came before it (control is FIFO), and all work still in
        flight is dropped after it."""
        stage = stages[i]
        committed = coord.sequences[seq].tokens
        tokens = started[seq][coord.sequences[seq].epoch]
        for layer in range(stage.start, stage.end):
            held = stage.model.entries(layer, stage.slots[seq])
            # every committed token but the last was needed to predict the last one
            if not len(committed) - 1 <= len(held) <= len(tokens):
                fail(
                    f"stage {i} layer {layer} holds {len(held)} positions of sequence {seq}: committed "
                    f"{len(committed)}, started {len(tokens)}"
                )
            n = min(len(held), len(committed))
            if held[:n] != reference(committed)[layer][:n] or held != reference(tokens)[layer][: len(held)]:
                fail(f"stage {i} layer {layer}: the cache of sequence {seq} is not a prefill of {committed}")

    def check_caches(i: int) -> None:
        """Stage ``i`` holds a prefill of what was started in the epoch it is in."""
        stage = stages[i]
        for seq, slot in stage.slots.items():
            tokens = started[seq][stage.epochs.get(seq, 0)]
            ref = reference(tokens)
            for layer in range(stage.start, stage.end):
                held = stage.model.entries(layer, slot)
                if len(held) > len(tokens) or held != ref[layer][: len(held)]:
                    fail(
                        f"stage {i} layer {layer} sequence {seq} holds {len(held)} positions that are not a "
                        f"prefill of {tokens}"
                    )

    for seq, (prompt, criteria, _) in run.sequences.items():
        coord.add_sequence(seq, list(prompt), criteria)
    pump()
    for _ in range(MAX_MOVES):
        moves = [("control", i) for i, q in enumerate(control) if q]
        moves += [("data", i) for i, q in enumerate(data) if q]
        moves += [("predictions", i) for i, q in enumerate(predictions) if q]
        moves += [("compute", i) for i, b in enumerate(busy) if b]
        if not moves:
            break
        kind, i = rng.choices(moves, [run.weights[move] for move in moves])[0]
        if kind == "control":
            event = control[i].popleft()
            if isinstance(event, Rollback) and event.epoch <= stages[i].epochs.get(event.seq, 0):
                seen["rollback after the newer epoch's data"] += 1
            if isinstance(event, SequenceFinished):
                check_final_caches(i, event.seq)
            stages[i].receive(event)
            busy[i] = True
        elif kind == "data":
            event = data[i].popleft()
            stage = stages[i + 1]
            if event.epoch > stage.epochs.get(event.seq, 0) and event.seq not in stage.finished:
                seen["newer epoch's data before the rollback"] += 1
            stage.receive(event)
            busy[i + 1] = True
        elif kind == "predictions":
            event = predictions[i].popleft()
            s = coord.sequences[event.seq]
            early = (
                s.inflight[0] if s.inflight and isinstance(event, FinalPrediction) and event.epoch == s.epoch else None
            )
            if early is not None and early != event.token and early in s.criteria.eos_token_ids:
                seen["early EOS rejected"] += 1
            coord.receive(event)
            pump()
        else:
            out = stages[i].next_action()
            if out is WAITING or out is DONE:
                busy[i] = False
            elif isinstance(out, Activations):
                data[i].append(out)
            elif isinstance(out, (EarlyPrediction, FinalPrediction)):
                predictions[i].append(out)
            else:
                fail(f"stage {i} produced {out}")
            check_caches(i)
        if trace:
            log.append(f"{kind} {i}" + (f": {out}" if kind == "compute" else ""))
    else:
        fail(f"still moving after {MAX_MOVES} moves (a livelock)")

    if pump() is not DONE:
        fail("the pipeline stalled: nothing left to deliver or compute, yet the coordinator waits")
    for i, stage in enumerate(stages):
        if stage.state is not StageState.RUNNING or stage.slots:
            fail(f"stage {i} ends {stage.state.name} holding slots {stage.slots}")
    for seq, (_, criteria, ref) in run.sequences.items():
        s = coord.sequences[seq]
        if s.generated != ref or shown[seq] != ref:
            fail(f"sequence {seq}: generated {s.generated}, shown {shown[seq]}, greedy {ref}")
        reason = "eos" if ref[-1] in criteria.eos_token_ids else "length"
        if s.finish_reason != reason:
            fail(f"sequence {seq} finished on {s.finish_reason}, not {reason}")
        tokens = started[seq][s.epoch]
        if tokens[: len(s.tokens)] != s.tokens[: len(tokens)]:
            fail(f"sequence {seq}: started {tokens} but committed {s.tokens}")
        seen["rollbacks"] += s.stats.rollbacks
        seen["accepted"] += s.stats.accepted
        seen["lookup guesses"] += s.stats.lookup_emitted - s.stats.drafted
        seen["drafts"] += s.stats.drafted
        seen["table drafts"] += s.stats.table_drafted
        seen["table drafts right"] += s.stats.table_accepted
        seen["early tokens rejected"] += s.stats.early_emitted - s.stats.accepted
    for stage in stages:
        seen["merged"] += stage.stats.merged
        seen["idle backfills"] += stage.stats.idle_backfills
        seen["dropped stale"] += stage.stats.dropped_stale
    return seen


@pytest.mark.parametrize("policy", ["eager", "deferred"])
@pytest.mark.parametrize("num_stages", [1, 2, 3])
def test_random_pipelines_decode_greedy_and_keep_exact_caches(num_stages, policy):
    seen = Counter()
    for seed in range(RUNS):
        seen += run_pipeline(seed, num_stages, policy)
    # the premises: the runs really went through the paths this test is for
    assert seen["rollbacks"] > RUNS and seen["accepted"] > RUNS
    assert seen["eos"] > RUNS // 4 and seen["length"] > RUNS // 4 and seen["early EOS rejected"] > 0
    # the context lookup's guesses went out too (fewer than without drafts: none rides on drafts)
    assert seen["lookup guesses"] > RUNS // 20
    # and its drafts (this model's greedy tokens rarely repeat, so few are right: the bundled
    # model's tests, tests/test_early_exit.py, are where right drafts abound)
    assert seen["drafts"] > RUNS // 10
    assert 0 < seen["table drafts right"] < seen["table drafts"]  # the draft table's, right and wrong
    assert seen["heads on again"] > 0  # the load rule switched a running sequence's heads back on
    if policy == "deferred":  # merging is rarer on later stages, which wait longer for the next token
        assert seen["merged"] > RUNS // 10 and seen["idle backfills"] > RUNS
    if num_stages > 1:  # data racing control: only between stages (stage 0 gets both on one channel)
        assert seen["dropped stale"] > 0
        assert seen["newer epoch's data before the rollback"] > 0
        assert seen["rollback after the newer epoch's data"] > 0
