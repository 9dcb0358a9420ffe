"""The simulator: real Stage and Coordinator on simulated time, fitted to traces recorded here."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from adadecode.launcher.sim_profiles import build_cpu_profile
from adadecode.launcher.simulate import main as simulate_main
from adadecode.launcher.trace_export import chrome_trace, read_trace
from adadecode.runtime.sim.costs import load_cpu_profile
from adadecode.runtime.sim.fit import calibrate, exit_stats, fit_costs
from adadecode.runtime.sim.heads import (
    CONFIRM,
    INFLIGHT,
    MARGIN,
    choose,
    conditional_exits,
    exit_table,
    replay_exits,
)
from adadecode.runtime.sim.simulator import Costs, ExitStats, SimHeads, SimSpec, simulate

TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"
EXITS = ExitStats({3: 0.3, 5: 0.4, 8: 0.5}, {3: 0.6, 5: 0.8, 8: 0.95})


def costs(**kw) -> Costs:
    return Costs(layer_s=[1e-3, 1.2e-3, 1.5e-3], **kw)


# --- the simulated decode is checked against greedy, whatever the schedule ------------------


@pytest.mark.parametrize("seed", range(12))
def test_every_simulated_decode_equals_greedy(seed):
    """Random settings (stages, policy, cap, sequences in flight, batching, the wait policy, costs):
    the tokens are the greedy truth and every cache stays a contiguous prefix (the simulated
    model asserts invariant 1 on every call)."""
    rng = random.Random(seed)
    stages = rng.choice([1, 2, 3, 4])
    cuts = sorted(rng.sample(range(1, 10), stages - 1))
    ranges = list(zip([0, *cuts], [*cuts, 10]))
    mode = rng.choice(["off", "eager", "deferred", "wait"])
    spec = SimSpec(
        num_layers=10, ranges=ranges,
        costs=costs(call_s=rng.random() * 1e-4, head_s=rng.random() * 1e-4, lm_head_s=rng.random() * 5e-3,
                    step_s=rng.random() * 1e-4, link_s=rng.random() * 1e-3, control_s=rng.random() * 1e-3,
                    shared_bus=rng.random()),
        exits=EXITS, head_layers=EXITS.layers if mode != "off" else (),
        early_exit="deferred" if mode == "wait" else mode, max_inflight=rng.randint(1, 4),
        prompts=[(rng.randint(1, 20), rng.randint(1, 40)) for _ in range(rng.randint(1, 5))],
        concurrency=rng.randint(1, 3), exact_batches=rng.random() < 0.5,
        wait_s=[rng.random() * 2e-3 for _ in ranges] if mode == "wait" else None, seed=seed,
    )
    res = simulate(spec)
    assert res.mismatches == 0
    assert res.tokens == sum(n for _, n in spec.prompts)
    if mode != "off":
        assert res.totals.counters.early_emitted > 0
    assert all(0.0 <= b <= res.elapsed_s + 1e-12 for b in res.totals.counters.stage_busy_s)


def test_one_stage_off_costs_add_up_exactly():
    """Plain decoding on one stage: the prefill, then one full pass and one LM head per token."""
    c = costs(call_s=2e-4, lm_head_s=5e-3, step_s=1e-4, row_s=1e-4)
    res = simulate(SimSpec(num_layers=10, ranges=[(0, 10)], costs=c, prompts=[(16, 20)]))
    prefill = c.call_s + 10 * c.layer(16) + c.lm_head_s + c.step_s
    step = c.call_s + 10 * c.layer(1) + c.lm_head_s + c.step_s
    assert res.elapsed_s == pytest.approx(prefill + 19 * step, rel=1e-9)
    assert c.layer(16) == pytest.approx(1.5e-3 + 13 * 1e-4)


def test_a_link_adds_its_latency_once_per_token_per_hop():
    base = SimSpec(num_layers=10, ranges=[(0, 4), (4, 7), (7, 10)], costs=costs(), prompts=[(8, 30)])
    slow = SimSpec(**{**vars(base), "costs": costs(link_s=1e-3)})
    assert simulate(slow).elapsed_s - simulate(base).elapsed_s == pytest.approx(30 * 2 * 1e-3, rel=1e-9)


def test_early_exit_fills_the_pipeline_and_a_perfect_head_pays():
    """Heads that are always right at the first stage boundary let the next token start there."""
    exits = ExitStats({5: 1.0}, {5: 1.0})
    spec = SimSpec(num_layers=10, ranges=[(0, 5), (5, 10)], costs=costs(lm_head_s=1e-3), exits=exits,
                   head_layers=(5,), early_exit="eager", prompts=[(8, 40)])
    off = simulate(SimSpec(**{**vars(spec), "early_exit": "off", "exits": None, "head_layers": ()}))
    on = simulate(spec)
    assert on.totals.counters.accepted == on.totals.counters.early_emitted > 0 and on.totals.counters.rollbacks == 0
    assert on.tokens_per_s > 1.3 * off.tokens_per_s


# --- fitted to traces recorded here ------------------------------------------------------------


@pytest.mark.parametrize("trace", ["1", "2", "3", "1-compiled", "2-compiled"])
def test_calibration_on_the_recorded_traces_is_within_15_percent(trace):
    """The committed `adadecode bench --trace` runs (scripts/bench_simulate.py, eager and with
    pipeline.compile=on): costs fitted on each, every mode simulated with its own exit statistics,
    tokens/s within 15% of measured."""
    ranks = int(trace[0])
    events, stages, other = read_trace(TRACES / f"bench-ranks-{trace}.json.gz")
    assert len(stages) == ranks
    result = calibrate(events, stages, other)
    assert set(result) == {"off", "eager", "deferred"}
    for mode, r in result.items():
        assert abs(r["error"]) < 0.15, (mode, r)
        assert r["simulated"]["tokens"] == sum(g["tokens"] for g in other["generations"] if g["mode"] == mode)


@pytest.mark.parametrize("compiled", [False, True])
def test_the_shipped_cpu_profile_is_what_the_recorded_traces_give(compiled):
    suffix = "-compiled" if compiled else ""
    built = build_cpu_profile(TRACES / f"bench-ranks-1{suffix}.json.gz", TRACES / f"bench-ranks-2{suffix}.json.gz")
    assert json.loads(json.dumps(built)) == load_cpu_profile(compiled)


def test_the_compiled_profile_prices_what_the_compiled_step_costs():
    """Compiled layers and LM head cost less than eager ones; the chooser takes the profile of the
    setting's pipeline.compile, so the same heads are judged on the costs they will run with."""
    from adadecode.runtime.sim.costs import SMOLLM2_135M, cpu_costs

    eager, compiled = cpu_costs(SMOLLM2_135M, 1), cpu_costs(SMOLLM2_135M, 1, compiled=True)
    assert compiled.layer_s[0] < eager.layer_s[0] and compiled.lm_head_s < eager.lm_head_s
    manifest = _bundled_manifest()
    one = choose(manifest, _Config, [(0, 30)], "deferred", "cpu", 4, 2, compiled=True)
    assert "compiled" in one.note


def test_merged_chunks_are_priced_as_the_runtime_runs_them():
    """Compiled on the CPU with row_invariant auto, a merged chunk's decode rows share one call
    (CompiledStep.merges): the chooser prices it as the compiled traces timed it, so deferred
    backfills look cheaper than where each row is its own call (eager, or row_invariant on)."""
    from adadecode.runtime.loading import LoadSpec

    assert LoadSpec(compile="on").shared_merges("cpu")
    assert not LoadSpec(compile="on", row_invariant="on").shared_merges("cpu")
    assert not LoadSpec(compile="off").shared_merges("cpu")
    assert not LoadSpec(compile="on").shared_merges("cuda")  # CUDA graphs: part by part
    assert LoadSpec(compile="off", row_invariant="off").shared_merges("cpu")
    manifest = _bundled_manifest()
    shared, per_row = (choose(manifest, _Config, [(0, 30)], "deferred", "cpu", 4, 2, compiled=True,
                              per_row_merges=p, alone=True) for p in (False, True))
    assert shared.speedup >= per_row.speedup
    assert dict(shared.alone) != dict(per_row.alone) or shared.speedup > per_row.speedup


def test_fitted_costs_are_those_of_the_machine():
    """A single-row layer of the bundled model reads ~14 MB of fp32 weights: about a millisecond
    at this machine's ~15 GB/s; the LM head (113 MB) several layers' worth."""
    events, _, other = read_trace(TRACES / "bench-ranks-2.json.gz")
    c = fit_costs(events, other)
    assert 0.5e-3 < c.layer_s[0] < 3e-3
    assert 4 < c.lm_head_s / c.layer_s[0] < 12
    assert c.layer_s == sorted(c.layer_s)
    assert c.link_s > 0 and c.control_s > 0 and c.hidden_bytes == 576 * 4


def test_a_trace_reads_back_as_its_events():
    events = [
        ("compute", 0, 1000, 5000, 0, 0, 0, 7, 0, 4, "plain"),
        ("head", 0, 5000, 5500, 0, 0, 7, 4, True),
        ("lm_head", 1, 9000, 9900, 1),
        ("send", 0, 5600, 0, 0, 0, 4, 7),
        ("early", -1, 5700, 0, 0, 7, 42, 4, 0.9),
        ("final", -1, 9950, 0, 0, 7, 42),
    ]
    path = Path(__file__).parent / "_trace_roundtrip.json"
    try:
        path.write_text(json.dumps(chrome_trace(events, [(0, 4), (4, 8)])))
        back, stages, _ = read_trace(path)
    finally:
        path.unlink(missing_ok=True)
    first = min(e[2] for e in events)
    shifted = [(e[0], e[1], *(t - first for t in e[2:4 if e[0] in ("compute", "head", "lm_head") else 3]),
                *e[4 if e[0] in ("compute", "head", "lm_head") else 3:]) for e in events]
    assert sorted(back) == sorted(shifted)
    assert stages == [(0, 4), (4, 8)]


def test_exit_statistics_count_exits_per_evaluation_and_confirmed_tokens():
    events = [
        ("head", 0, 0, 1, 1, 0, 5, 4, True), ("head", 0, 2, 3, 1, 0, 6, 4, False),
        ("early", -1, 1, 1, 0, 5, 9, 4, 0.9), ("final", -1, 4, 1, 0, 5, 9),
        ("head", 0, 5, 6, 2, 0, 3, 4, True), ("early", -1, 6, 2, 0, 3, 1, 4, 0.9), ("final", -1, 7, 2, 0, 3, 8),
    ]
    s = exit_stats(events)
    assert s.rate == {4: 2 / 3} and s.precision == {4: 0.5}
    assert exit_stats(events, {1}).precision == {4: 1.0}


# --- defaults per setting ------------------------------------------------------------------------


def _bundled_manifest() -> dict:
    from adadecode.runtime.exit_heads import bundled_heads_path

    return json.loads((bundled_heads_path() / "manifest.json").read_text())


class _Config:  # the bundled SmolLM2-135M's shape
    name_or_path, model_type, num_hidden_layers, hidden_size, intermediate_size = "smollm2", "llama", 30, 576, 1536
    num_key_value_heads, num_attention_heads, head_dim, vocab_size = 3, 9, 64, 49152
    max_position_embeddings, tie_word_embeddings = 8192, True


def test_a_token_counts_once_across_heads():
    table = {4: [(0.8, 0.2, 0.7)], 9: [(0.8, 0.5, 0.9)], 12: [(0.8, 0.3, 0.95)]}
    s = conditional_exits({4: 0.8, 9: 0.8, 12: 0.8}, table)
    assert s.rate[4] == pytest.approx(0.2)
    assert s.rate[9] == pytest.approx((0.5 - 0.2) / 0.8)
    assert s.rate[12] == 0.0  # every token it is confident on was already confident at 9
    assert s.precision == {4: 0.7, 9: 0.9, 12: 0.95}


def test_replayed_heads_read_one_answer_in_order_and_exit_at_the_first_confident_head():
    """Token by token: 0 exits at 4 (wrong), 1 at 9 (right: 4 was not confident), 2 at 9 too
    (right), 3 at no head. A simulated sequence reads consecutive tokens from a start of its own,
    so easy and hard tokens keep their runs; every head answers as that token's outcome says."""
    outcomes = {4: ([0.9, 0.1, 0.2, 0.1], [False, True, True, True]),
                9: ([0.95, 0.9, 0.85, 0.3], [True, True, True, False]),
                12: ([0.99, 0.99, 0.99, 0.5], [True, True, True, True])}
    replay = replay_exits({4: 0.8, 9: 0.8}, outcomes)
    assert replay.layers == (4, 9) and replay.tokens == 4
    truth = lambda pos: 1000 + pos  # noqa: E731
    heads = SimHeads(replay, replay.layers, truth, seed=3)

    def seen(l: int, pos: int, slot: int) -> tuple[bool, bool]:  # (exits, right)
        token, conf = heads.predict(l, torch.tensor([7, pos, slot]))
        return conf > 0, token == truth(pos + 1)

    def outcome(l: int, i: int) -> tuple[bool, bool]:
        conf, agreed = outcomes[l][0][i % 4], outcomes[l][1][i % 4]
        return conf > 0.8, conf > 0.8 and agreed

    for slot in (0, 1):
        observed = [(seen(4, p, slot), seen(9, p, slot), seen(12, p, slot)) for p in range(8)]
        assert any(observed == [(outcome(4, i + p), outcome(9, i + p), (False, False)) for p in range(8)]
                   for i in range(4))
    # in a whole run: every token that reaches a confident head exits there, right or wrong as it was
    costs = Costs(layer_s=[1e-3, 1.5e-3], head_s=1e-4, lm_head_s=1e-3)
    always_wrong = replay_exits({4: 0.8, 9: 0.8}, {4: ([0.9] * 5, [False] * 5), 9: ([0.95] * 5, [True] * 5)})
    late_right = replay_exits({4: 0.95, 9: 0.8}, {4: ([0.9] * 5, [False] * 5), 9: ([0.95] * 5, [True] * 5)})
    for exits, layer, acceptance in ((always_wrong, 4, 0.0), (late_right, 9, 1.0)):
        result = simulate(SimSpec(num_layers=12, ranges=[(0, 6), (6, 12)], costs=costs, exits=exits,
                                  head_layers=exits.layers, early_exit="eager", prompts=[(8, 16)] * 2))
        summary = result.summary()
        assert result.mismatches == 0 and summary["acceptance_rate"] == acceptance
        assert set(summary["exit_rate_per_head"]) == {layer}


def test_on_one_cpu_stage_no_head_pays_and_on_two_ranks_eager_heads_do():
    manifest = _bundled_manifest()
    assert exit_table(manifest)
    one = choose(manifest, _Config, [(0, 30)], "deferred", "cpu", 4, 2)
    assert one.layers == () and one.speedup < MARGIN and "runs as off" in one.note
    two = choose(manifest, _Config, [(0, 19), (19, 30)], "eager", "cpu", 4, 2)
    assert two.layers and len(two.thresholds) == len(two.layers) and two.speedup >= MARGIN
    assert choose(manifest, _Config, [(0, 19), (19, 30)], "eager", "cpu", 4, 2) == two  # every rank agrees


def test_the_choice_is_scored_on_the_larger_replayed_sample():
    """The search's finalists are scored again on CONFIRM's 16 answers (other starts than the
    search's 4): the speedup a choice reports is its speedup there."""
    from dataclasses import replace

    from adadecode.runtime.exit_heads import bundled_heads_path, read_outcomes
    from adadecode.runtime.sim.costs import SMOLLM2_135M, setting_costs

    manifest = _bundled_manifest()
    outcomes = read_outcomes(bundled_heads_path(), manifest)
    ranges = [(0, 19), (19, 30)]
    choice = choose(manifest, _Config, ranges, "eager", "cpu", 4, 2, outcomes=outcomes)
    assert choice.layers and choice.max_inflight == 2
    costs = setting_costs(SMOLLM2_135M, "cpu", 2, 4)
    costs = replace(costs, layer_s=[costs.layer_s[0] * n for n in range(1, len(costs.layer_s) + 1)])
    exits = replay_exits(dict(zip(choice.layers, choice.thresholds)), outcomes)
    on = SimSpec(num_layers=30, ranges=ranges, costs=costs, exits=exits, head_layers=exits.layers,
                 early_exit="eager", prompts=CONFIRM, seed=1)
    off = replace(on, exits=None, head_layers=(), early_exit="off")
    assert choice.speedup == round(simulate(on).tokens_per_s / simulate(off).tokens_per_s, 3)


def test_an_mlp_head_is_priced_by_the_weights_it_reads():
    """The same exit statistics from a costlier head: never predicted faster than the linear one."""
    from adadecode.runtime.sim.costs import SMOLLM2_135M, cpu_costs

    manifest = _bundled_manifest()
    mlp = {**manifest, "head_type": "mlp", "mlp_hidden": 256}
    extra = 2 * 256 * 576 + 576
    assert cpu_costs(SMOLLM2_135M, 2, head_extra=extra).head_s > cpu_costs(SMOLLM2_135M, 2).head_s
    linear = choose(manifest, _Config, [(0, 19), (19, 30)], "eager", "cpu", 4, 2)
    assert choose(mlp, _Config, [(0, 19), (19, 30)], "eager", "cpu", 4, 2).speedup <= linear.speedup


def test_a_larger_head_vocabulary_is_priced_by_the_rows_it_reads():
    """Heads scoring 4,096 tokens read 3,072 LM-head rows more per evaluation than the 1,024-token
    heads the profiles were fitted with: the same exit statistics never predicted faster."""
    from adadecode.runtime.sim.heads import head_extra_weights

    manifest = _bundled_manifest()
    assert head_extra_weights(manifest, 576) == 0  # the bundled heads: 1,024 tokens, linear
    wide = {**manifest, "vocabulary": {**manifest["vocabulary"], "size": 4096}}
    assert head_extra_weights(wide, 576) == 3072 * 576
    assert head_extra_weights({"head_type": "mlp", "mlp_hidden": 256, "vocabulary": {"size": 4096}}, 576) == (
        2 * 256 * 576 + 576 + 3072 * 576)
    assert head_extra_weights({}, 576) == 0  # heads written before the vocabulary was recorded
    linear = choose(manifest, _Config, [(0, 19), (19, 30)], "eager", "cpu", 4, 2)
    assert choose(wide, _Config, [(0, 19), (19, 30)], "eager", "cpu", 4, 2).speedup < linear.speedup


def test_max_inflight_is_chosen_with_the_heads_when_left_open():
    """max_inflight 0: the heads chosen at 2, then the fewest in-flight tokens within 1% of the best
    for them; never predicted slower than the same heads at 2."""
    manifest = _bundled_manifest()
    fixed = choose(manifest, _Config, [(0, 19), (19, 30)], "deferred", "cpu", 4, 2)
    open_ = choose(manifest, _Config, [(0, 19), (19, 30)], "deferred", "cpu", 4, 0)
    assert fixed.max_inflight == 2 and open_.max_inflight in INFLIGHT
    assert open_.layers == fixed.layers and open_.speedup >= fixed.speedup / 1.01
    assert f"max_inflight {open_.max_inflight}" in open_.note


def test_the_context_lookup_is_replayed_with_the_heads():
    """A token the lookup guesses exits at the first selected head with the guess's outcome; the
    bundled heads record the lookup beside their outcomes, and plan_heads chooses with it (the
    guesses are right far more often than the heads: the prediction rises), or without it at 0."""
    from adadecode.runtime.exit_heads import bundled_heads_path, read_lookup_outcomes, read_outcomes
    from adadecode.runtime.loading import LoadSpec, prepare
    from adadecode.runtime.sim.heads import plan_heads, with_lookup

    outcomes = {4: (torch.tensor([0.1, 0.9, 0.2]), torch.tensor([True, False, False]))}
    match, agrees = torch.tensor([0, 3, 2]), torch.tensor([False, True, True])
    conf, right = with_lookup(outcomes, 3, match, agrees)[4]
    assert conf.tolist() == pytest.approx([0.1, 1.0, 0.2]) and right.tolist() == [True, True, False]
    assert with_lookup(outcomes, 2, match, agrees)[4][1].tolist() == [True, True, True]

    path = bundled_heads_path()
    match, agrees = read_lookup_outcomes(path, _bundled_manifest())
    assert len(match) == len(read_outcomes(path, _bundled_manifest())[19][0])
    assert 0.5 < float((match >= 3).float().mean()) < 0.65 and float(agrees[match >= 3].float().mean()) > 0.85
    cpu, fp32 = torch.device("cpu"), torch.float32
    two = LoadSpec(stages=2, auto_heads_for="eager", max_inflight=2)
    _, with_it = plan_heads(two, *prepare(two), cpu, fp32, ranks=True)
    _, without = plan_heads(two.replace(lookup=0), *prepare(two), cpu, fp32, ranks=True)
    assert with_it.speedup > without.speedup + 0.1, (with_it, without)


def test_heads_that_pay_only_with_the_guesses_run_off_for_sequences_without_them(model_dir):
    """One compiled stage (merged rows shared), deferred: the choice with the lookup's guesses pays
    (layer 4) where the same heads without them do not, so a sampled sequence, which gets no
    guesses, runs early exit off; on 2 ranks the heads pay alone too, and every sequence uses them."""
    from adadecode.runtime.exit_heads import bundled_heads_path, read_lookup_outcomes, read_outcomes
    from adadecode.runtime.sampling import SamplingParams
    from adadecode.runtime.sim.heads import HeadChoice
    from helpers import make_engine

    path, manifest = bundled_heads_path(), _bundled_manifest()
    kw = {"outcomes": read_outcomes(path, manifest), "lookup": 3,
          "lookup_outcomes": read_lookup_outcomes(path, manifest)}
    one = choose(manifest, _Config, [(0, 30)], "deferred", "cpu", 4, 0, ranks=False, compiled=True,
                 per_row_merges=False, **kw)
    assert one.layers and one.speedup >= MARGIN and one.without_lookup < MARGIN and one.needs_lookup
    assert "sampled sequences, which get none, run early exit off" in one.note
    two = choose(manifest, _Config, [(0, 19), (19, 30)], "eager", "cpu", 4, 0, **kw)
    assert two.without_lookup >= MARGIN and not two.needs_lookup

    engine = make_engine(model_dir, [(0, 3), (3, 6)])
    engine.heads_choice, engine.lookup = one, 3
    sampled = SamplingParams(0.7, seed=1)
    assert engine.early_exit_for("deferred") == "deferred" and engine.early_exit_for("deferred", sampled) == "off"
    assert engine.early_exit_for("deferred", SamplingParams(0.0)) == "deferred"  # temperature 0 alone is greedy
    engine.lookup = 0  # no guesses for anyone
    assert engine.early_exit_for("eager") == "off"
    engine.heads_choice, engine.lookup = two, 3
    assert engine.early_exit_for("eager", sampled) == "eager"
    engine.heads_choice = HeadChoice((), (), 1.0, "none pays")
    assert engine.early_exit_for("eager") == "off"


def test_heads_are_chosen_before_loading_and_loading_never_imports_the_simulator():
    """plan_heads turns a request for heads per setting into explicit layers and thresholds (or
    no heads at all) that the loader takes as given; the loader's import graph has no simulator."""
    import subprocess
    import sys

    from adadecode.runtime.loading import LoadSpec, prepare
    from adadecode.runtime.sim.heads import plan_heads

    code = "import sys, adadecode.runtime.loading; print(sorted(m for m in sys.modules if '.runtime.sim' in m))"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]"

    cpu, fp32 = torch.device("cpu"), torch.float32
    one = LoadSpec(stages=1, auto_heads_for="deferred")
    spec, choice = plan_heads(one, *prepare(one), cpu, fp32, ranks=False)
    assert choice is not None and choice.layers == () and spec.heads is None and spec.auto_heads_for is None
    two = LoadSpec(stages=2, auto_heads_for="eager", max_inflight=0)
    spec, choice = plan_heads(two, *prepare(two), cpu, fp32, ranks=True)
    assert choice.layers and spec.exit_layers == choice.layers and spec.thresholds == choice.thresholds
    assert spec.max_inflight == choice.max_inflight >= 1
    given = two.replace(exit_layers=(19,), thresholds=(0.5,))
    assert plan_heads(given, *prepare(given), cpu, fp32, ranks=True) == (given, None)  # explicit heads win
    off = two.replace(auto_heads_for=None)
    assert plan_heads(off, *prepare(off), cpu, fp32, ranks=True) == (off, None)


def test_drafts_run_where_a_chunk_costs_about_a_row_and_take_the_place_of_the_head_choice():
    """``draft: -1`` is 3 where a chunk's decode rows share one call (compiled on the CPU, or
    row_invariant off) and none elsewhere; a number is kept; no lookup, no drafts. Where drafts
    run, no heads are chosen (the choice does not model them): ``_plan`` loads none."""
    from adadecode.runtime.engine import _plan
    from adadecode.runtime.loading import DEFAULT_DRAFT, LoadSpec, prepare

    assert LoadSpec(compile="on").drafts("cpu") == DEFAULT_DRAFT == 3
    assert LoadSpec(compile="off", row_invariant="off").drafts("cpu") == 3
    assert LoadSpec(compile="off").drafts("cpu") == LoadSpec(compile="on").drafts("cuda") == 0
    assert LoadSpec(compile="off", draft=2).drafts("cpu") == 2
    assert LoadSpec(compile="on", lookup=0).drafts("cpu") == 0
    cpu, fp32 = torch.device("cpu"), torch.float32
    for compile, heads in (("on", None), ("off", "auto")):
        two = LoadSpec(stages=2, auto_heads_for="eager", max_inflight=0, compile=compile)
        spec, choice = _plan(two, *prepare(two), cpu, fp32, ranks=True)
        assert spec.heads == heads and spec.draft == (3 if compile == "on" else 0)
        assert (choice is None) == (compile == "on") and spec.max_inflight >= 1
    given = LoadSpec(stages=2, auto_heads_for="eager", compile="on", exit_layers=(19,), thresholds=(0.5,))
    spec, choice = _plan(given, *prepare(given), cpu, fp32, ranks=True)  # heads given: they run with the drafts
    assert choice is None and spec.heads == "auto" and spec.exit_layers == (19,) and spec.draft == 3


# --- the command -----------------------------------------------------------------------------------


def test_simulate_a_setting_and_a_trace(capsys):
    assert simulate_main(["--stages", "2", "--early-exit", "eager", "--sequences", "2", "--new-tokens", "32",
                          "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["stages"]) == 2
    assert out["tokens"] == 64 and out["vs_off"] > 0
    assert simulate_main(["--trace", str(TRACES / "bench-ranks-1.json.gz"), "--json"]) == 0
    cal = json.loads(capsys.readouterr().out)["calibration"]
    assert set(cal) == {"off", "eager", "deferred"}


def test_simulate_refuses_an_impossible_stage_count(capsys):
    assert simulate_main(["--stages", "31"]) == 2
    assert "--stages 31" in capsys.readouterr().err


def test_an_engine_whose_setting_no_head_pays_in_runs_early_exit_as_off(tmp_path):
    from adadecode.runtime.sim.heads import HeadChoice
    from helpers import make_engine, save_tiny_model

    engine = make_engine(save_tiny_model(tmp_path / "m"), [(0, 2), (2, 4)])
    plain = engine.generate([1, 2, 3], max_new_tokens=12, early_exit="off")
    engine.heads_choice = HeadChoice((), (), 0.9, "no exit head setting is predicted to pay")
    assert engine.early_exit_off_here
    res = engine.generate([1, 2, 3], max_new_tokens=12, early_exit="deferred")
    assert res.tokens == plain.tokens
    assert res.stats["early_emitted"] == 0 and res.stats["early_exit"] == "off"


def test_simulate_a_heads_directory_token_by_token_or_from_its_table(tmp_path, capsys):
    """--exits DIR: heads with a calibration table only (the bundled ones without their outcomes)
    and a copy that carries per-token outcomes; the outcomes are what is counted when they are there."""
    import shutil

    import torch
    from adadecode.runtime.exit_heads import OUTCOMES_FILE, bundled_heads_path, read_manifest
    from safetensors.torch import save_file

    base = ["--stages", "2", "--early-exit", "eager", "--sequences", "2", "--new-tokens", "32", "--json"]
    bundled = tmp_path / "table"
    shutil.copytree(bundled_heads_path(), bundled)
    (bundled / OUTCOMES_FILE).unlink(missing_ok=True)
    manifest = read_manifest(bundled)
    manifest["files"].pop(OUTCOMES_FILE, None)
    (bundled / "manifest.json").write_text(json.dumps(manifest))
    assert simulate_main([*base, "--exits", str(bundled), "--exit-layers", "19,25", "--thresholds", "0.5"]) == 0
    from_table = json.loads(capsys.readouterr().out)
    assert from_table["vs_off"] > 1.0 and from_table["acceptance_rate"] > 0
    assert simulate_main([*base, "--exits", str(bundled), "--exit-layers", "19", "--thresholds", "0.55"]) == 2
    assert "no row" in capsys.readouterr().err

    heads = tmp_path / "heads"
    shutil.copytree(bundled, heads)
    manifest = read_manifest(heads)
    n = 100  # every token confident and right at 19: all exit there
    outcomes = {"confidence.19": torch.ones(n, dtype=torch.float16), "agrees.19": torch.ones(n, dtype=torch.uint8)}
    save_file(outcomes, str(heads / OUTCOMES_FILE))
    manifest["files"][OUTCOMES_FILE] = {"bytes": (heads / OUTCOMES_FILE).stat().st_size,
                                        "sha256": hashlib.sha256((heads / OUTCOMES_FILE).read_bytes()).hexdigest()}
    (heads / "manifest.json").write_text(json.dumps(manifest))
    assert simulate_main([*base, "--exits", str(heads), "--exit-layers", "19", "--thresholds", "0.55"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert exact["acceptance_rate"] == 1.0 and exact["vs_off"] > from_table["vs_off"]
    # a head over 16,384 tokens reads 16 times the LM-head rows per evaluation: priced so, as the head choice does
    manifest["vocabulary"]["size"] = 16384
    (heads / "manifest.json").write_text(json.dumps(manifest))
    assert simulate_main([*base, "--exits", str(heads), "--exit-layers", "19", "--thresholds", "0.55"]) == 0
    assert json.loads(capsys.readouterr().out)["vs_off"] < exact["vs_off"]
    assert simulate_main([*base, "--exits", str(heads), "--exit-layers", "7"]) == 2  # in the manifest, no outcomes
    assert "per-token outcomes have no heads at [7]" in capsys.readouterr().err
    assert simulate_main([*base, "--exits", str(tmp_path / "nothing")]) == 2
    assert "give measured, paper, or a heads directory" in capsys.readouterr().err
    # --lookup: the bundled heads record the lookup's outcomes; these two copies do not
    assert simulate_main([*base, "--exits", str(heads), "--exit-layers", "19", "--lookup", "3"]) == 2
    assert "records no context lookup outcomes" in capsys.readouterr().err
    assert simulate_main([*base, "--exits", str(bundled), "--exit-layers", "19", "--lookup", "3"]) == 2
    assert "no per-token outcomes" in capsys.readouterr().err
    assert simulate_main([*base, "--lookup", "3"]) == 2 and "apply to --exits DIR" in capsys.readouterr().err
    assert simulate_main([*base, "--lookup", "-1"]) == 2 and "match length" in capsys.readouterr().err
    shipped = [*base, "--sequences", "8", "--exits", str(bundled_heads_path()), "--exit-layers", "19,25",
               "--thresholds", "0.3,0.5"]
    assert simulate_main(shipped) == 0
    alone = json.loads(capsys.readouterr().out)
    assert simulate_main([*shipped, "--lookup", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["acceptance_rate"] > alone["acceptance_rate"]


def test_finalists_tied_on_the_confirming_sample_go_to_the_one_the_search_scored_higher(monkeypatch):
    """Every selection ties on CONFIRM's answers: the choice is the search's best, not the fifth."""
    from types import SimpleNamespace

    import adadecode.runtime.sim.heads as sim_heads

    def score(exits):  # more heads, and more exits, score higher in the search
        return 1.0 + 0.01 * len(exits.layers) + 0.001 * sum(exits.rate.values())

    searched = []

    def fake(spec):
        if spec.exits is None:
            return SimpleNamespace(tokens_per_s=1.0)
        if spec.seed == 1:  # the confirming sample
            return SimpleNamespace(tokens_per_s=1.5)
        searched.append(score(spec.exits))
        return SimpleNamespace(tokens_per_s=searched[-1])

    monkeypatch.setattr(sim_heads, "simulate", fake)
    sim_heads._choose.cache_clear()  # choices other tests made with the real simulator
    try:
        manifest = _bundled_manifest()
        choice = choose(manifest, _Config, [(0, 19), (19, 30)], "eager", "cpu", 4, 2)
    finally:
        sim_heads._choose.cache_clear()  # nor may later tests get the fake's
    assert choice.speedup == 1.5
    chosen = conditional_exits(dict(zip(choice.layers, choice.thresholds)), dict(exit_table(manifest)))
    assert score(chosen) == max(searched)
