"""`adadecode bench`: tokens/s of this runtime against transformers' `generate`.

Every contender runs greedy, batch 1, in this process with the same torch
threads, on the same prompts, interleaved prompt by prompt so that drift in the
machine's speed hits all alike:

- ``hf``: transformers ``generate(do_sample=False)``, the parity reference;
- ``off``, ``eager``, ``deferred``: this runtime with each early-exit mode
  (``--modes``), on the configured stages;
- ``hf-ee-K``: transformers ``generate(assistant_early_exit=K)`` (LayerSkip-style
  self-speculation, ``--hf-early-exit``), when asked for.

Tokens/s is generated tokens (prompt excluded) over the wall time of the whole
call, prefill included. Each runtime mode's tokens are compared with ``hf``'s,
so a speedup never hides a parity break; on compiled stages (``bench``'s default,
launcher/cli.py), whose kernels round differently from transformers', with
``off``'s (always timed, first), and each row also counts the prompts identical
to ``hf``'s (``identical_to_hf_generate``). This runtime's rows also report each
stage's busy fraction and its merged / idle-backfill counts, and early-exit
modes the exit rate and precision per head, the acceptance rate, the rollbacks
and the fraction of compute they discarded (runtime/run_stats.py, as the
generate command's summary). ``--trace DIR`` records the timed runs (docs/generating.md, Traces).

With ``--temperature`` > 0 the contenders sample (runtime/sampling.py) and the
reference is plain sampling of this runtime, ``off`` (always timed; transformers
is not run: its sampler draws other tokens). Each other early-exit mode runs
under each of ``--sampling-modes``: ``seeded`` rows must give ``off``'s tokens
(``deferred`` up to rounding), ``speculative`` rows are the same distribution,
not the same samples, so their identical count is information, not a check.

    taskset -c 0,1 adadecode bench --pipeline.threads=2 --num-prompts 8
    taskset -c 0 adadecode bench --pipeline.threads=1 --modes off,deferred,eager --hf-early-exit 8,15,22
    taskset -c 0 adadecode bench --pipeline.threads=1 --modes off,eager,deferred --temperature 0.8 --top-p 0.95 \
        --sampling-modes seeded,speculative
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from adadecode.runtime.prompts import select_prompts
from adadecode.runtime.run_stats import RunTotals

from .config import RunConfig, sampling_params

if TYPE_CHECKING:
    from adadecode.runtime.engine import Engine


def first_divergence(ours: list[int], ref: list[int]) -> int | None:
    """Index of the first differing token (or length mismatch), ``None`` when identical."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            return i
    return None if len(ours) == len(ref) else min(len(ours), len(ref))


def hf_generate(model, ids: list[int], max_new_tokens: int, eos: list[int], **kwargs) -> tuple[list[int], float]:
    """transformers' greedy ``generate``: (new token ids, wall seconds)."""
    x = torch.tensor([ids], device=model.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos[0],
            **kwargs,
        )
    new = out[0, len(ids) :].tolist()  # on a GPU this waits for the last token
    return new, time.perf_counter() - t0


class _Tally:
    """Totals of one contender over the prompts."""

    def __init__(self):
        self.tokens = self.seconds = self.matches = 0
        self.hf_matches = 0  # a compiled run: prompts identical to transformers' generate
        self.totals = RunTotals()  # this runtime's counters (not transformers')
        self.divergences: list[dict] = []

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class BenchPlan:
    """What `bench` times, checked before any model loads."""

    runs: list[tuple[str, str, object]]  # (name, early_exit, SamplingParams or None), from ``contenders``
    hf_ks: list[int]  # transformers generate(assistant_early_exit=K) for each K
    sampling: object  # SamplingParams, or None: greedy
    prompts: list


def plan_bench(args, cfg: RunConfig) -> BenchPlan:
    """The contenders and prompts of ``args``; a bad flag or prompt file raises here (a user error)."""
    modes = [m for m in args.modes.split(",") if m]
    hf_ks = [int(k) for k in args.hf_early_exit.split(",") if k]
    sampling = sampling_params(cfg.sampling)
    runs = contenders(modes, sampling, getattr(args, "sampling_modes", ""))
    if sampling is not None and hf_ks:
        raise ValueError("--hf-early-exit compares greedy decoding; drop it, or sample no more (--temperature 0, "
                         "or --generation-config none where the model's generation config samples)")
    return BenchPlan(runs, hf_ks, sampling, select_prompts(args.prompts, args.num_prompts))


def run_bench(args, cfg: RunConfig, plan: BenchPlan, engine: Engine) -> int:
    """Time ``plan`` on ``engine``: the stages in this process, or rank 0's ``PipelineEngine``."""
    from transformers import AutoModelForCausalLM

    d = cfg.decoding
    runs, hf_ks, sampling, prompts = plan.runs, plan.hf_ks, plan.sampling, plan.prompts
    # Compiled kernels round differently from transformers' (docs/exactness.md): a compiled run's
    # parity reference is its own plain decoding, `off` (timed first), and `generate`'s match count
    # is reported beside it.
    compiled = sampling is None and engine.compiled
    if compiled:
        runs = [("off", "off", None)] + [r for r in runs if r[1] != "off"]
    hf = None
    if sampling is None:
        stage0 = engine.stages[0].model  # rank 0's own stage: the reference runs on its device, in its dtype
        hf = AutoModelForCausalLM.from_pretrained(str(engine.resolved.path), dtype=stage0.dtype)
        hf = hf.to(stage0.device).eval()
    trace = getattr(args, "trace", None)  # recording since start-up (launcher/launch.py)
    eos = sorted(engine.eos_token_ids)
    encoded = [engine.encode(p, d.chat or isinstance(p, list)) for p in prompts]

    for ids in encoded[: args.warmup]:
        if hf is not None:
            hf_generate(hf, ids, 8, eos)
        for _, mode, params in runs:
            engine.generate(ids, max_new_tokens=8, early_exit=mode, sampling=params)

    if trace:
        engine.runner.trace.clear()  # the timed runs only
    names = [name for name, _, _ in runs]
    tally = {name: _Tally() for name in (["hf"] if hf is not None else []) + names + [f"hf-ee-{k}" for k in hf_ks]}
    generations = []  # each timed generation of this runtime, for the trace (the simulator fits on it)
    for n, ids in enumerate(encoded):
        ref = hf_ref = None
        if hf is not None:
            hf_ref, t_hf = hf_generate(hf, ids, d.max_new_tokens, eos)
            ref = None if compiled else hf_ref
            t = tally["hf"]
            t.tokens, t.seconds, t.matches = t.tokens + len(hf_ref), t.seconds + t_hf, t.matches + 1
        for name, mode, params in runs:
            res = engine.generate(ids, max_new_tokens=d.max_new_tokens, early_exit=mode, sampling=params)
            ref = res.tokens if ref is None else ref  # sampling or compiled: off, run first, is the reference
            t, st = tally[name], res.stats
            if compiled:
                t.hf_matches += res.tokens == hf_ref
            t.tokens += len(res.tokens)
            t.seconds += st["elapsed_s"]
            t.totals.add(len(res.tokens), res.counters)
            generations.append({"seq": st["seq"], "mode": name, "ran_as": st["early_exit"],
                                "prompt_tokens": res.prompt_tokens, "tokens": len(res.tokens),
                                "elapsed_s": round(st["elapsed_s"], 6)})
            at = first_divergence(res.tokens, ref)
            t.matches += at is None
            if at is not None and (params is None or params.mode == "seeded"):  # speculative: not a parity check
                t.divergences.append(
                    {"prompt": n, "position": at, "ours": res.tokens[at : at + 1], "reference": ref[at : at + 1]}
                )
        for k in hf_ks:
            out, secs = hf_generate(hf, ids, d.max_new_tokens, eos, assistant_early_exit=k)
            t = tally[f"hf-ee-{k}"]
            t.tokens, t.seconds, t.matches = t.tokens + len(out), t.seconds + secs, t.matches + (out == ref)

    base = tally["hf"].tokens_per_s if hf is not None else None
    off = tally["off"].tokens_per_s if "off" in tally else None
    rows = {}
    for name, t in tally.items():
        row = {"tokens_per_s": round(t.tokens_per_s, 2)}
        if base:
            row["vs_hf_generate"] = round(t.tokens_per_s / base, 3)
        row["token_identical_prompts"] = f"{t.matches}/{len(encoded)}"
        if compiled and name in names:
            row["identical_to_hf_generate"] = f"{t.hf_matches}/{len(encoded)}"
        if off and name not in ("hf", "off") and not name.startswith("hf-"):
            row["vs_off"] = round(t.tokens_per_s / off, 3)
        if name in names:
            summary = t.totals.summary()
            keys = ["stage_busy_fraction", "stage_merged", "stage_idle_backfills"]
            if name != "off":
                keys += ["exit_rate_per_head", "precision_per_head", "acceptance_rate", "lookup_rate",
                         "lookup_acceptance", "draft_rate", "table_rate", "table_acceptance", "rollbacks",
                         "discarded_fraction"]
            row.update({k: summary[k] for k in keys})
        if t.divergences:
            row["divergences"] = t.divergences
        rows[name] = row
    summary = {
        "model": engine.resolved.origin,
        "prompts": len(encoded),
        "max_new_tokens": d.max_new_tokens,
        "threads": torch.get_num_threads(),
        "stages": engine.layer_ranges,
        "sampling": None if sampling is None else dataclasses.asdict(sampling),
        "reference": ("off (compiled plain decoding of this runtime)" if compiled
                      else "hf" if hf is not None else "off (plain sampling of this runtime)"),
        "results": rows,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            if k != "results":
                print(f"{k:>16}: {v}")
        for name, row in rows.items():
            print(f"{name:>16}: " + ", ".join(f"{k}={v}" for k, v in row.items()))
    if trace:
        from .trace_export import save_trace

        save_trace(trace, engine, {name: tally[name].totals.summary() for name in names},
                   {"generations": generations, "threads": torch.get_num_threads(),
                    "max_inflight": engine.max_inflight})
    exact = [name for name, mode, params in runs if mode != "deferred" and (params is None or params.mode == "seeded")]
    return 0 if all(tally[name].matches == len(encoded) for name in exact) else 1


def contenders(modes: list[str], sampling, sampling_modes: str) -> list[tuple[str, str, object]]:
    """``(name, early_exit, SamplingParams or None)`` per timed run. Sampling: ``off`` first
    (the reference), then each other mode under each sampling mode."""
    from adadecode.runtime.sampling import SAMPLING_MODES

    if sampling is None:
        if sampling_modes:
            raise ValueError("--sampling-modes needs --temperature > 0 (temperature 0 is greedy)")
        return [(m, m, None) for m in modes]
    chosen = [m for m in sampling_modes.split(",") if m] or [sampling.mode]
    for m in chosen:
        if m not in SAMPLING_MODES:
            raise ValueError(f"--sampling-modes: `{m}` is not one of {', '.join(SAMPLING_MODES)}")
    runs = [("off", "off", sampling)]
    for mode in (m for m in modes if m != "off"):
        for m in chosen:
            name = f"{mode}:{m}" if len(chosen) > 1 else mode
            runs.append((name, mode, dataclasses.replace(sampling, mode=m)))
    return runs
