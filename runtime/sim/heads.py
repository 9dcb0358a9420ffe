"""Default exit heads per setting: chosen by the simulator, so that turning early exit on never loses.

Theory of operation. Whether an early exit pays depends on the setting, not
only on the heads: on one CPU stage a deferred chunk of two rows costs about
1.6x a single row (fp32, this project's CPU), so the saving is small and a
rejected token or a head evaluation eats it; across ranks an exit lets the
next token into stage 0 while later stages finish, and the same heads pay. So
when the config leaves ``decoding.exit_layers`` and ``thresholds`` empty, the
heads are chosen for the setting at start-up:

- costs: runtime/sim/costs.py for the setting's device (the CPU costs fitted
  here, eager or compiled as ``pipeline.compile`` has it, scaled to the model's size
  and dtype; on CUDA, whatever the GPU, the derived costs of H100s joined by NVLink), the stage split and whether the
  stages are ranks (stages in one process run one after another: one stage);
- exit statistics, on the heads' validation prompts (never trained on): where
  ``train-heads`` recorded each validation token's confidence and correctness at
  every head (``outcomes.safetensors``), the simulated heads replay those tokens in
  the order the answers generated them: a token exits at the first selected head
  whose confidence passes its threshold, right or wrong as that head was
  (``replay_exits``), and easy and hard tokens come in the runs they came in
  (rates alone, as if every token were drawn on its own, overrated the speedup by
  about 10%, docs/results.md). With the context lookup on (``LoadSpec.lookup``)
  and its outcomes recorded beside the heads', a token it guesses exits at the
  first selected head, right or wrong as the guess was (``with_lookup``). Heads
  trained before that record only a calibration table (exit rate and precision per head and
  threshold); a head's chance to exit when reached is then estimated by assuming
  that a token confident at one head is confident at the later heads too
  (``conditional_exits``), which overrates many early, imprecise heads;
- the objective: the simulated speedup over early exit off, with the real Stage
  and Coordinator (runtime/sim/simulator.py) and the setting's policy and
  ``max_inflight``;
- the search: heads in order of depth, each off or at one of ``THRESHOLDS``,
  keeping whatever raises the simulated speedup; then a second pass that revisits
  each head given the others (a shallow head chosen first can stop paying once
  deeper heads are in); the search scores each candidate on 4 simulated answers,
  and its ``FINALISTS`` best are scored again on 16 others (``CONFIRM``), which
  decide, so that the choice is not the one a small sample flatters.

``plan_heads`` makes the choice before any weight is loaded (Engine.load, load_rank) and
hands the loader explicit layers and thresholds, so loading never runs the simulator.

If the best choice is not predicted at least ``MARGIN`` faster than off — the
largest error the simulator showed against measurement (docs/results.md, Simulator: calibration) —
no head is used and early exit runs as off, with a note saying so. Choices are
deterministic, so every rank of a job chooses the same heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from ..loading import LoadSpec, resolve_heads
from ..model_source import ResolvedModel
from .costs import HEAD_VOCAB, ModelShape, setting_costs
from .simulator import ExitReplay, ExitStats, SimSpec, simulate

# Down to where a wrong guess costs about an idle stage's time: on ranks a rejected early token
# mostly costs work a stage would otherwise not have had (the hand-tuned 2-rank config runs 0.5).
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
INFLIGHT = (1, 2, 3, 4)  # max_inflight candidates when the config leaves it to the choice (0)
MARGIN = 1.07  # the simulator's largest calibration error here was 6.9% (3 ranks, off)
PROMPTS = [(48, 96)] * 4  # the simulated benchmark each candidate is scored on in the search
# The search's best few are scored again on more replayed answers, other ones: on 4 answers a
# replayed selection's speedup varies by about +-5%, and the best of many candidates on one small
# sample is the one that sample flatters most.
CONFIRM, FINALISTS = [(48, 96)] * 16, 5


@dataclass(frozen=True)
class HeadChoice:
    layers: tuple[int, ...]  # empty: no head pays in this setting; early exit runs as off
    thresholds: tuple[float, ...]
    speedup: float  # simulated, over early exit off
    note: str
    # With choose(alone=True): every head's threshold, the chosen one or else the best for that head alone
    alone: tuple[tuple[int, float], ...] = ()
    max_inflight: int = 2  # unverified early tokens per sequence: given, or chosen with the heads
    # Chosen with the context lookup's guesses: the same heads' speedup for a sequence that gets
    # none (sampled, or asking for penalties or log probabilities); None: chosen without guesses.
    without_lookup: float | None = None

    @property
    def needs_lookup(self) -> bool:
        """These heads pay only with the lookup's guesses: a sequence without them runs as off."""
        return self.without_lookup is not None and bool(self.layers) and self.without_lookup < MARGIN


def plan_heads(spec: LoadSpec, resolved: ResolvedModel, config, ranges: list[tuple[int, int]],
               device: torch.device, dtype: torch.dtype, *, ranks: bool) -> tuple[LoadSpec, HeadChoice | None]:
    """``spec`` with the heads chosen for its setting, and the choice; ``(spec, None)`` where there
    is nothing to choose (early exit off, heads given explicitly, or heads without a calibration).
    A choice of no head loads none (``heads=None``): early exit runs as off. ``ranks``: one rank
    per stage; False: the stages run one after another in one process."""
    if not spec.chooses_heads:
        return spec, None
    path = resolve_heads(spec.heads, resolved)
    if path is None:
        return spec, None
    from ..exit_heads import read_all_outcomes, read_manifest

    manifest = read_manifest(path)
    if calibration_table(manifest) is None:  # heads without one keep their defaults
        return spec, None
    element_size = torch.empty((), dtype=dtype).element_size()
    outcomes, lookup_outcomes = read_all_outcomes(path, manifest)
    choice = choose(manifest, config, ranges, spec.auto_heads_for, device.type, element_size, spec.max_inflight,
                    ranks=ranks, outcomes=outcomes, compiled=spec.compiled(device.type),
                    per_row_merges=not spec.shared_merges(device.type), lookup=spec.lookup,
                    lookup_outcomes=lookup_outcomes)
    if not choice.layers:
        return spec.replace(heads=None, auto_heads_for=None), choice
    return spec.replace(exit_layers=choice.layers, thresholds=choice.thresholds, auto_heads_for=None,
                        max_inflight=choice.max_inflight), choice


def calibration_table(manifest: dict) -> dict | None:
    """The manifest's calibration on prompts never trained on: validation, else the held-out
    table if that is all it has; None: heads without one (nothing to choose from)."""
    return manifest.get("validation_calibration") or manifest.get("calibration") or None


def exit_table(manifest: dict) -> dict[int, list[tuple[float, float, float]]]:
    """Per head layer: (threshold, exit rate, precision) rows of ``calibration_table``."""
    table = calibration_table(manifest)
    if table is None:
        raise ValueError("the exit heads' manifest has no calibration table; retrain them with `adadecode train-heads`")
    return {int(l): [(r["threshold"], r["exit_rate"], r["precision"]) for r in h["sweep"]]
            for l, h in table["heads"].items()}


def conditional_exits(selection: dict[int, float], table) -> ExitStats:
    """``{layer: threshold}`` as the simulator's per-head rates, counting a token once (see above)."""
    rate, precision, before = {}, {}, 0.0
    for l in sorted(selection):
        row = next(r for r in table[l] if r[0] == selection[l])
        marginal = row[1]
        rate[l] = max(0.0, marginal - before) / (1 - before) if before < 1 else 0.0
        precision[l] = row[2]
        before = max(before, marginal)
    return ExitStats(rate, precision)


def replay_exits(selection: dict[int, float], outcomes) -> ExitReplay:
    """``{layer: threshold}`` replayed from each validation token's outcome at every head, in the
    order the answers generated them: a token exits at the first selected head above its threshold
    (the runtime evaluates no later head for it), right or wrong as that head was, and the runs of
    easy and hard tokens stay as they came. ``outcomes``: {layer: (confidence per token, agreed per
    token), tensors or sequences; sequences are used as they are, not copied: the head choice
    replays the same outcomes for every candidate)."""
    def values(x) -> Sequence:
        return x.tolist() if isinstance(x, torch.Tensor) else x

    return ExitReplay(dict(selection), {l: values(outcomes[l][0]) for l in selection},
                      {l: values(outcomes[l][1]) for l in selection})


def choose(manifest: dict, config, ranges: list[tuple[int, int]], policy: str, device_type: str,
           element_size: int, max_inflight: int, ranks: bool = True, outcomes=None, alone: bool = False,
           compiled: bool = False, per_row_merges: bool = True, lookup: int = 0, lookup_outcomes=None) -> HeadChoice:
    """The heads for this setting (see the module docstring). ``ranks``: one rank per stage;
    False: the stages run one after another in one process, which times like one stage.
    ``outcomes``: ``exit_heads.read_outcomes`` of the heads, when they have them. ``alone``: also
    a threshold for every head (train-heads writes them in the manifest). ``compiled``: the stages
    run the compiled layer loop (costs of runtime/sim/costs.py's compiled CPU profile).
    ``per_row_merges``: a merged chunk's decode rows run as one call each (``LoadSpec.shared_merges``
    false), so a chunk of k decode rows is priced as k single rows, not as the shared call the traces timed.
    ``lookup``, ``lookup_outcomes``: the context lookup's shortest match and ``read_lookup_outcomes``
    of the heads (``with_lookup``); without both, the heads are chosen as if it were off."""
    shape = ModelShape.from_config(config)
    simulated = tuple(map(tuple, ranges)) if ranks else ((0, shape.layers),)
    table = tuple((l, tuple(rows)) for l, rows in sorted(exit_table(manifest).items()))  # hashable, for the cache

    def hashable(outcomes):
        return None if outcomes is None else tuple(
            (l, tuple(conf.tolist()), tuple(agree.tolist())) for l, (conf, agree) in sorted(outcomes.items()))

    plain = hashable(outcomes)
    guessed = outcomes is not None and lookup and lookup_outcomes is not None
    exact = hashable(with_lookup(outcomes, lookup, *lookup_outcomes)) if guessed else plain
    return _choose(shape, simulated, policy, device_type, element_size, max_inflight, table, exact, alone,
                   head_extra_weights(manifest, shape.hidden), compiled, per_row_merges, plain if guessed else None)


def with_lookup(outcomes, lookup: int, match: torch.Tensor, agrees: torch.Tensor):
    """The heads' per-token ``outcomes`` as the runtime meets them with a context lookup of shortest
    match ``lookup``: a token the lookup guesses exits at the first selected head with the guess
    (confidence 1 at every head, right or wrong as the guess was); the others as the heads were."""
    guessed = match >= lookup
    return {l: (torch.where(guessed, torch.ones_like(conf), conf), torch.where(guessed, agrees, agree))
            for l, (conf, agree) in outcomes.items()}


def head_extra_weights(manifest: dict, hidden: int) -> int:
    """Weights one evaluation of these heads reads beyond a linear head over 1,024 tokens (what
    costs.head_weights prices): an MLP head's W1, W2 and norm, and the LM-head rows of a larger
    restricted vocabulary, or of the whole one (manifest ``vocabulary.size``; absent: 1,024)."""
    extra = 0
    if manifest.get("head_type") == "mlp":
        extra += 2 * int(manifest["mlp_hidden"]) * hidden + hidden
    vocab = manifest.get("vocabulary")
    if isinstance(vocab, dict) and isinstance(vocab.get("size"), int):
        extra += (vocab["size"] - HEAD_VOCAB) * hidden
    return extra


@lru_cache(maxsize=16)
def _choose(shape: ModelShape, ranges, policy, device_type, element_size, max_inflight, rows, exact,
            alone: bool, head_extra: int, compiled: bool, per_row_merges: bool, plain=None) -> HeadChoice:
    """``exact``: the per-token outcomes the heads are chosen on (with the lookup's guesses where it
    is on); ``plain``: then the heads' own, on which the choice is scored again for sequences
    without guesses (``HeadChoice.without_lookup``)."""
    table = dict(rows)
    per_token = None if exact is None else {l: (conf, agree) for l, conf, agree in exact}
    stages = len(ranges)
    costs = setting_costs(shape, device_type, stages, element_size, head_extra=head_extra, compiled=compiled)
    if per_row_merges:  # each decode row of a merged chunk runs as its own call (runtime/row_invariant.py)
        costs = replace(costs, layer_s=[costs.layer_s[0] * n for n in range(1, len(costs.layer_s) + 1)])
    layers = [l for l in sorted(table) if l < shape.layers]
    samples = {"search": (PROMPTS, 0), "confirm": (CONFIRM, 1)}  # prompts, seed (the replay's starts)
    off = {k: simulate(SimSpec(num_layers=shape.layers, ranges=list(ranges), costs=costs, prompts=prompts,
                               seed=seed)).tokens_per_s for k, (prompts, seed) in samples.items()}
    scored: dict[tuple, float] = {}  # every selection the search scored

    def speedup(selection: dict[int, float], inflight: int, sample: str = "search", outcomes=None) -> float:
        if not selection:
            return 1.0
        outcomes = per_token if outcomes is None else outcomes
        exits = conditional_exits(selection, table) if outcomes is None else replay_exits(selection, outcomes)
        prompts, seed = samples[sample]
        spec = SimSpec(num_layers=shape.layers, ranges=list(ranges), costs=costs, exits=exits, seed=seed,
                       head_layers=exits.layers, early_exit=policy, max_inflight=inflight, prompts=prompts)
        s = simulate(spec).tokens_per_s / off[sample]
        if sample == "search":
            scored[tuple(sorted(selection.items()))] = s
        return s

    def candidates(l: int) -> list[float]:
        return THRESHOLDS if per_token is not None else [t for t in THRESHOLDS if any(r[0] == t for r in table[l])]

    def search(inflight: int) -> tuple[dict[int, float], float]:
        # Two passes in order of depth: the first adds heads; the second revisits each head given
        # all the others (off included), since a shallow head that paid alone can cost more than it
        # saves once deeper heads let the same tokens out.
        best, best_speedup = {}, 1.0
        for second in (False, True):
            for l in layers:
                rest = {k: v for k, v in best.items() if k != l}
                options = [{**rest, l: t} for t in candidates(l)] + ([rest] if second and l in best else [])
                for selection in options:
                    s = speedup(selection, inflight)
                    if s > best_speedup:
                        best, best_speedup = selection, s
        # the finalists, scored again on the larger sample
        finalists = sorted(((s, sel) for sel, s in scored.items() if s > 1.0), reverse=True)[:FINALISTS]
        confirmed = [(1.0, ())] + [(speedup(dict(sel), inflight, "confirm"), sel) for _, sel in finalists]
        # max keeps the first of equals: no head unless a finalist beats it there too, then the
        # finalist the search scored higher
        best_speedup, chosen = max(confirmed, key=lambda c: c[0])
        return dict(chosen), best_speedup

    # max_inflight: the given one; else the heads are chosen at the default 2 and then the fewest
    # in-flight tokens within 1% of the best for them (each more is more work thrown away at a
    # rollback, for a gain the simulator cannot resolve). One search, not one per candidate: start-up.
    best, best_speedup = search(max_inflight or 2)
    inflight = max_inflight or 2
    if not max_inflight and best:
        speeds = {m: best_speedup if m == 2 else speedup(best, m, "confirm") for m in INFLIGHT}
        inflight = min(m for m, x in speeds.items() if x >= max(speeds.values()) / 1.01)
        best_speedup = speeds[inflight]
    where = (f"{stages} stage{'s' if stages > 1 else ''} on {device_type}{', compiled' if compiled else ''}, "
             f"{policy} backfill")
    paying = best_speedup >= MARGIN
    each = () if not alone else tuple(
        (l, best[l] if paying and l in best else max(candidates(l), key=lambda t: (speedup({l: t}, inflight), t)))
        for l in layers if candidates(l))
    if not paying:
        return HeadChoice((), (), round(best_speedup, 3),
                          f"no exit head setting is predicted to pay for {where} (best {best_speedup:.2f}x of off, "
                          f"under the {MARGIN:.2f}x margin): early exit runs as off; set decoding.exit_layers and "
                          "decoding.thresholds to use heads anyway", each, inflight)
    chosen = tuple(sorted(best))
    note = (f"exit heads for {where}: layers {list(chosen)}, thresholds {[best[l] for l in chosen]}, "
            f"max_inflight {inflight} (simulated {best_speedup:.2f}x of off")
    alone_speedup = None
    if plain is not None:  # chosen with the lookup's guesses: and for a sequence that gets none?
        alone_speedup = round(speedup(best, inflight, "confirm", {l: (c, a) for l, c, a in plain}), 3)
        note += (f" with the context lookup's guesses, {alone_speedup:.2f}x without them"
                 + (": sampled sequences, which get none, run early exit off" if alone_speedup < MARGIN else ""))
    return HeadChoice(chosen, tuple(best[l] for l in chosen), round(best_speedup, 3), note + ")", each, inflight,
                      alone_speedup)
