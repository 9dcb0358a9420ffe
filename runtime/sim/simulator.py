"""The simulator: this runtime's own scheduling on a simulated clock with simulated costs.

Theory of operation. Nothing about scheduling is modelled twice: the real
``Stage`` and ``Coordinator`` (and the ``ActionRouter`` every runner shares)
run unchanged; only the model, the exit heads and the clock are simulated.

- ``SimModel`` keeps the StageModel interface the Stage uses. Its hidden state is
  a row ``[token, pos, slot]`` per position; it keeps each layer's cache length (so
  invariant 1 of docs/design.md is still checked) and charges each call's cost to its
  rank's clock. The final layer predicts ``truth(pos + 1)``: a fixed token per
  position, so every simulated decode is checked against plain greedy.
- ``SimHeads``: with ``ExitStats``, a head decides per ``(layer, pos, token)`` from a
  hash: it exits with the layer's exit rate (given that it is evaluated) and is right
  with its precision, every position on its own; with ``ExitReplay``, each simulated
  sequence reads real validation tokens in the order an answer generated them, from a
  start drawn per (batch, stage 0's cache slot), and a head exits where that token's
  confidence passed its threshold, right or wrong as it was. The replay keeps what
  the rates lose: easy and hard tokens come in runs, and rates alone overrated the
  heads' choice (docs/results.md, "Heads per setting", "Replayed in order"). A
  decision is the same whenever the same input is seen again.
- ``simulate`` drives one rank per stage the way ``DistributedRunner`` does: take
  in what has arrived, call ``stage.next_action()`` once, ship the output (data
  to the next rank after the link's latency and transfer time, predictions to
  the coordinator on rank 0 after the control plane's latency). Ranks are
  stepped in order of simulated time, so nothing sees a message before it
  arrives. With one stage it is the LocalRunner's single loop.

Costs (``Costs``) are seconds: per layer for a chunk of 1..k rows, a fixed cost
per compute call, per head evaluation, per LM-head call, per runner step, and
the links. ``shared_bus`` models ranks that share one memory bus (CPU ranks on
one node): a step that starts while ``k`` other ranks compute takes
``1 + shared_bus * k`` times as long. Fitting them from a trace is
runtime/sim/fit.py's job; profiles of other hardware are launcher/simulate.py's.

The ``wait`` policy exists only here, for the design comparison: a rank after the
first holds a parked deferred backfill for up to ``wait_s`` for the next token
instead of running it at once as an idle backfill.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..coordinator import Coordinator
from ..events import (
    DONE,
    WAITING,
    Activations,
    EarlyPrediction,
    FinalPrediction,
    Verified,
)
from ..run_stats import GenerationStats, RunTotals
from ..runners.routing import ActionRouter
from ..stage import Stage
from ..stopping import StopCriteria

VOCAB = 1 << 20


def _mix(*xs: int) -> int:
    """A deterministic 62-bit hash of ints (``hash()`` is salted per process)."""
    h = 0x243F6A8885A308D3
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & ((1 << 62) - 1)


def _uniform(*xs: int) -> float:
    return _mix(*xs) / float(1 << 62)


@dataclass
class Costs:
    """What each piece of work costs, in seconds (see the module docstring)."""

    layer_s: list[float]  # one layer on a chunk of n rows: layer_s[n - 1]
    row_s: float | None = None  # per layer, each row beyond the table (prefill); None: the table's last slope
    call_s: float = 0.0  # fixed cost of one compute call (a segment of layers), whatever its length
    kv_s: float = 0.0  # per layer, per row and per cached position attended (attention's KV reads)
    head_s: float = 0.0  # one exit head evaluation
    lm_head_s: float = 0.0  # the final norm and LM head on one row (more rows scale like a layer)
    step_s: float = 0.0  # the runner's own work per stage output (receive, route, ship)
    link_s: float = 0.0  # data plane: latency of one hop
    link_bytes_per_s: float = math.inf  # data plane: bandwidth
    control_s: float = 0.0  # control plane: one message between a rank and the coordinator
    hidden_bytes: int = 0  # bytes of one row of activations
    shared_bus: float = 0.0  # slowdown per other rank computing at the same time (0: own devices)

    def layer(self, rows: int) -> float:
        t = self.layer_s
        if rows <= len(t):
            return t[rows - 1]
        slope = self.row_s if self.row_s is not None else (t[-1] - t[-2] if len(t) > 1 else t[-1])
        return t[-1] + slope * (rows - len(t))

    def compute(self, rows: int, layers: int, kv_len: int) -> float:
        kv = self.kv_s * layers * rows * (kv_len + (rows + 1) / 2)
        return self.call_s + layers * self.layer(rows) + kv

    def lm_head(self, rows: int) -> float:
        return self.lm_head_s * self.layer(rows) / self.layer(1)

    def hop(self, rows: int) -> float:
        return self.link_s + rows * self.hidden_bytes / self.link_bytes_per_s

    def to_dict(self) -> dict:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> Costs:
        d = dict(d)
        if d.get("link_bytes_per_s") is None:
            d["link_bytes_per_s"] = math.inf
        return cls(**d)


@dataclass
class ExitStats:
    """Per head layer: the chance it exits when evaluated, and the chance its token is right."""

    rate: dict[int, float]
    precision: dict[int, float]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.rate))

    def moved(self, to: dict[int, int]) -> ExitStats:
        """The heads at the layers ``to`` maps to, each with the statistics of its source layer."""
        return ExitStats({new: self.rate[old] for new, old in to.items()},
                         {new: self.precision[old] for new, old in to.items()})


@dataclass
class ExitReplay:
    """Exit heads replayed from per-token outcomes (``train-heads``' ``outcomes.safetensors``): per
    head layer, each validation token's confidence and whether the head agreed with the final layer,
    in the order the answers generated them; a head exits when the confidence passes ``thresholds``."""

    thresholds: dict[int, float]
    confidence: dict[int, Sequence[float]]
    agreed: dict[int, Sequence[bool]]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.thresholds))

    @property
    def tokens(self) -> int:
        return len(self.confidence[self.layers[0]])

    def moved(self, to: dict[int, int]) -> ExitReplay:
        return ExitReplay({new: self.thresholds[old] for new, old in to.items()},
                          {new: self.confidence[old] for new, old in to.items()},
                          {new: self.agreed[old] for new, old in to.items()})


class _Clock:
    def __init__(self):
        self.now = 0.0
        self.bus = 1.0  # this step's slowdown from ranks sharing the memory bus


class SimModel:
    """Layers ``[start, end)``: cache lengths only; every call charges ``costs`` to ``clock``."""

    def __init__(self, start: int, end: int, num_layers: int, num_slots: int, costs: Costs, clock: _Clock, truth):
        self.start, self.end = start, end
        self.args = SimpleNamespace(num_layers=num_layers)
        self.num_slots = num_slots
        self.device = torch.device("cpu")
        self.costs, self.clock, self.truth = costs, clock, truth
        self._len = [[0] * (end - start) for _ in range(num_slots)]

    def _charge(self, seconds: float) -> None:
        self.clock.now += seconds * self.clock.bus

    def cache_length(self, layer: int, slot: int) -> int:
        return self._len[slot][layer - self.start]

    def truncate(self, slot: int, length: int) -> None:
        self._len[slot] = [min(n, length) for n in self._len[slot]]

    def reset(self, slot: int) -> None:
        self._len[slot] = [0] * (self.end - self.start)

    def embed(self, tokens) -> torch.Tensor:
        return torch.tensor([[t, -1, -1] for t in tokens], dtype=torch.int64)

    def _advance(self, hidden: torch.Tensor, pos: int, first: int, last: int, slot: int) -> torch.Tensor:
        lengths = self._len[slot]
        for layer in range(first, last):
            if lengths[layer - self.start] != pos:
                raise AssertionError(
                    f"simulated layer {layer} holds {lengths[layer - self.start]} positions, not {pos}"
                )
            lengths[layer - self.start] = pos + hidden.shape[0]
        out = hidden.clone()
        out[:, 1] = torch.arange(pos, pos + hidden.shape[0])
        fresh = out[:, 2] < 0  # stage 0's new rows; later stages keep stage 0's slot, so every head agrees
        out[fresh, 2] = slot  # which sequence: the replayed heads read its tokens
        return out

    def run_layers(self, hidden, pos: int, first: int, last: int, slot: int, parts=None) -> torch.Tensor:
        self._charge(self.costs.compute(hidden.shape[0], last - first, pos))
        return self._advance(hidden, pos, first, last, slot)

    def run_layers_batch(self, chunks, first: int, last: int, exact: bool = True, parts=None) -> list[torch.Tensor]:
        if exact:  # each sequence through its own calls, back to back
            return [self.run_layers(h, pos, first, last, slot) for h, pos, slot in chunks]
        rows = sum(h.shape[0] for h, _, _ in chunks)
        kv = max(pos for _, pos, _ in chunks)
        self._charge(self.costs.compute(rows, last - first, kv))
        return [self._advance(h, pos, first, last, slot) for h, pos, slot in chunks]

    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        self._charge(self.costs.lm_head(hidden.shape[0]))
        return [self.truth(int(pos) + 1) for _, pos, _ in hidden.tolist()]


class SimHeads:
    """Exit heads that behave as ``ExitStats`` or ``ExitReplay`` say (``_StageHeads`` charges each
    evaluation). ``batch``: the simulated benchmark's batch of sequences now running (the replay
    draws each sequence's start from it and the sequence's cache slot)."""

    def __init__(self, exits: ExitStats | ExitReplay, layers, truth, seed: int):
        self.layers = tuple(sorted(layers))
        self.thresholds = {l: 0.5 for l in self.layers}
        self.exits, self.truth, self.seed = exits, truth, seed
        self.batch = 0

    def predict(self, layer: int, row: torch.Tensor) -> tuple[int, float]:
        token, pos, slot = (int(x) for x in row.tolist())
        right = self.truth(pos + 1)
        if isinstance(self.exits, ExitReplay):
            if layer not in self.exits.thresholds:
                return 0, 0.0
            i = (_mix(self.seed, 4, self.batch, slot) + pos) % self.exits.tokens
            if self.exits.confidence[layer][i] <= self.exits.thresholds[layer]:
                return 0, 0.0
            if self.exits.agreed[layer][i]:
                return right, 1.0
        elif _uniform(self.seed, 1, layer, pos, token) >= self.exits.rate.get(layer, 0.0):
            return 0, 0.0
        elif _uniform(self.seed, 2, layer, pos, token) < self.exits.precision.get(layer, 0.0):
            return right, 1.0
        return (right + 1 + _mix(self.seed, 3, layer, pos) % (VOCAB - 1)) % VOCAB, 1.0  # any other token


@dataclass
class SimSpec:
    """One simulated benchmark: ``prompts`` (each a prompt length and how many tokens to decode)."""

    num_layers: int
    ranges: list[tuple[int, int]]  # each stage's [start, end)
    costs: Costs
    exits: ExitStats | ExitReplay | None = None
    head_layers: tuple[int, ...] = ()
    early_exit: str = "off"
    max_inflight: int = 2
    prompts: list[tuple[int, int]] = field(default_factory=lambda: [(32, 64)])
    concurrency: int = 1  # sequences in flight at once (1: one generation after another, as `bench`)
    exact_batches: bool = True
    early_exit_below: int | None = None  # serving's load rule (Coordinator)
    wait_s: list[float] | None = None  # the `wait` policy: per stage, how long a parked backfill waits
    seed: int = 0


@dataclass
class SimResult:
    totals: RunTotals  # the counters, and every number derived from them, as a real run has them
    mismatches: int  # generated tokens that differ from the greedy truth (must be 0)

    @property
    def tokens(self) -> int:
        return self.totals.tokens

    @property
    def elapsed_s(self) -> float:
        return self.totals.counters.elapsed_s

    @property
    def tokens_per_s(self) -> float:
        return self.totals.tokens_per_s

    def summary(self) -> dict:
        """runtime/run_stats.py's summary: the same derived numbers as a measured run's."""
        return self.totals.summary()


class _Rank:
    def __init__(self, index: int, stage: Stage, clock: _Clock):
        self.index, self.stage, self.clock = index, stage, clock
        self.inbox: list = []  # heap of (arrival, order, event)
        self.idle = False  # its last step found nothing to do: it sleeps until something arrives
        self.parked_since: float | None = None
        self.step_end = 0.0  # end of its current or last step (for the shared bus)
        self.busy_s = 0.0

    def ready_at(self, wait_s: float | None) -> float:
        arrival = self.inbox[0][0] if self.inbox else math.inf
        if not self.idle:
            return self.clock.now
        if self.parked_since is not None and wait_s is not None:
            return min(arrival, self.parked_since + wait_s)
        return max(self.clock.now, arrival)


def simulate(spec: SimSpec) -> SimResult:
    """Run ``spec`` on simulated ranks; tokens, simulated time and the real state machines' counters."""
    if spec.early_exit != "off" and (spec.exits is None or not spec.head_layers):
        raise ValueError(f"early_exit `{spec.early_exit}` needs exit statistics and head layers")
    costs = spec.costs

    def truth(pos: int) -> int:
        return _mix(spec.seed, 0, pos) % VOCAB

    clocks = [_Clock() for _ in spec.ranges]
    heads = None
    if spec.early_exit != "off":
        heads = SimHeads(spec.exits, spec.head_layers, truth, spec.seed)
    slots = max(1, spec.concurrency)
    ranks = []
    for i, (a, b) in enumerate(spec.ranges):
        model = SimModel(a, b, spec.num_layers, slots, costs, clocks[i], truth)
        stage_heads = None
        if heads is not None and any(a < l <= b and l < spec.num_layers for l in heads.layers):
            stage_heads = _StageHeads(heads, clocks[i], costs)
        stage = Stage(i, len(spec.ranges), model, stage_heads, spec.early_exit if heads else "off",
                      exact_batches=spec.exact_batches)
        ranks.append(_Rank(i, stage, clocks[i]))
    order = [0]

    def post(rank: _Rank, at: float, event) -> None:
        order[0] += 1
        heapq.heappush(rank.inbox, (at, order[0], event))

    rank0 = ranks[0]

    def to_every_stage(event) -> None:
        rank0.stage.receive(event)
        rank0.idle = False
        for r in ranks[1:]:
            post(r, rank0.clock.now + costs.control_s, event)

    def to_first(event) -> None:
        rank0.stage.receive(event)
        rank0.idle = False

    router = ActionRouter(to_first, to_every_stage)
    totals = RunTotals()

    def run(coord: Coordinator, start: float) -> float:
        for r in ranks:
            r.clock.now = max(r.clock.now, start)
            r.idle, r.parked_since = False, None
        verified: list[Verified] = []
        router.pump(coord, verified.append)
        while True:
            at, _, r = min((x.ready_at(_wait(spec, x.index)), x.index, x) for x in ranks)
            if at == math.inf:
                if router.pump(coord, verified.append) is DONE:
                    return max(x.clock.now for x in ranks)
                raise RuntimeError("simulated pipeline stalled: the coordinator waits and no rank has work")
            r.clock.now = max(r.clock.now, at)
            take_in(r, coord)
            if r.index == 0 and router.pump(coord, verified.append) is DONE:
                # the run returns once every rank has answered `released`: after the step it is in
                return max([r.clock.now] + [max(x.step_end, r.clock.now + costs.control_s) + costs.control_s
                                            for x in ranks[1:]])
            stage = r.stage
            if spec.wait_s is not None and r.index > 0 and not stage.queued and not stage.ready and stage.parked:
                if r.parked_since is None:
                    r.parked_since = r.clock.now
                if r.clock.now < r.parked_since + spec.wait_s[r.index]:
                    r.idle = True
                    continue
            r.parked_since = None
            t0 = r.clock.now
            others = sum(1 for x in ranks if x is not r and x.step_end > t0)
            r.clock.bus = 1.0 + costs.shared_bus * others
            out = stage.next_action()
            r.clock.bus = 1.0
            if out is WAITING or out is DONE:
                r.busy_s += r.clock.now - t0
                r.step_end = r.clock.now
                r.idle = r.clock.now == t0
                continue
            r.busy_s += r.clock.now - t0  # as the runners time it: inside next_action()
            r.clock.now += costs.step_s
            r.step_end = r.clock.now
            take_in(r, coord)  # what arrived during the step, before shipping (a rollback makes it stale)
            if r.index == 0:
                router.pump(coord, verified.append)
            if isinstance(out, Activations):
                if not stage.is_stale(out):
                    post(ranks[r.index + 1], r.clock.now + costs.hop(out.hidden.shape[0]), out)
            elif r.index == 0:
                router.predict(coord, out)
            else:
                post(rank0, r.clock.now + costs.control_s, out)

    def take_in(r: _Rank, coord: Coordinator) -> None:
        """Everything that has reached ``r`` by its clock: predictions to the coordinator (rank 0),
        the rest to its stage."""
        while r.inbox and r.inbox[0][0] <= r.clock.now:
            _, _, event = heapq.heappop(r.inbox)
            r.idle = False
            if isinstance(event, (EarlyPrediction, FinalPrediction)):
                if event.seq in coord.sequences:  # else of a run that has ended: dropped, as ranks do
                    router.predict(coord, event)
            else:
                r.stage.receive(event)

    def _wait(spec: SimSpec, index: int):
        return None if spec.wait_s is None else spec.wait_s[index]

    now, seq, mismatches = 0.0, 0, 0
    batches = [spec.prompts[i : i + spec.concurrency] for i in range(0, len(spec.prompts), spec.concurrency)]
    for index, batch in enumerate(batches):
        if heads is not None:
            heads.batch = index
        coord = Coordinator(max_inflight=spec.max_inflight, early_exit_below=spec.early_exit_below)
        seqs = []
        for n, new_tokens in batch:
            criteria = StopCriteria(max_new_tokens=new_tokens)
            coord.add_sequence(seq, [1 + i for i in range(n)], criteria, early_exit=spec.early_exit)
            seqs.append((seq, n))
            seq += 1
        busy0 = [r.busy_s for r in ranks]
        stages0 = [r.stage.stats.copy() for r in ranks]
        end = run(coord, now)
        counters = GenerationStats.of(
            [coord.sequences[s].stats for s, _ in seqs], elapsed_s=end - now,
            stage_busy_s=[r.busy_s - b for r, b in zip(ranks, busy0)],
            stage_stats=[r.stage.stats - s0 for r, s0 in zip(ranks, stages0)],
        )
        now, tokens = end, 0
        for s, n in seqs:
            generated = coord.sequences[s].generated
            tokens += len(generated)
            mismatches += sum(t != truth(n + i) for i, t in enumerate(generated))
        totals.add(tokens, counters)
    return SimResult(totals, mismatches)

class _StageHeads:
    """One stage's view of the shared ``SimHeads``: evaluations charged to that stage's clock."""

    def __init__(self, heads: SimHeads, clock: _Clock, costs: Costs):
        self.heads, self.clock, self.costs = heads, clock, costs
        self.layers, self.thresholds = heads.layers, heads.thresholds

    def predict(self, layer: int, row: torch.Tensor) -> tuple[int, float]:
        self.clock.now += self.costs.head_s * self.clock.bus
        return self.heads.predict(layer, row)
