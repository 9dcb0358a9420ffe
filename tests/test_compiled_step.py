"""The compiled layer loop (runtime/compiled_step.py) on tiny models, on the CPU.

- Traced with dynamo's ``eager`` backend (the same aten ops, so the same bits), it must give the
  eager path's tokens with and without early exit, on 1 to 3 stages, and never recompile as a
  sequence grows: positions are tensors and the attended length is dynamic.
- Compiled by inductor (the real kernels; autotuning off to keep the test short), early exit
  must still change nothing: the segments are cut at the head layers whether early exit is on
  or off (docs/design.md, invariant 4).
- With the runtime's settings (the C++ GEMM template, autotuning on), a merged chunk of decode rows
  is one call whose rows get the one-row graph's bits (pipeline.row_invariant, docs/exactness.md).
- The families beyond Llama's layout compile too: Phi-3 (fused projections, partial rotary),
  Qwen3-MoE (transformers' experts block, whose grouped-GEMM path has static shapes) and Gemma 3
  (a local layer's window as a mask over the valid prefix, where eager slices it: the tokens
  agree on the tiny model, prompts longer than its window of 4).
"""

from __future__ import annotations

import pytest
import torch
from adadecode.runtime.compiled_step import FUSED_ROWS, CompiledStep, maybe_compile, row_buckets
from adadecode.runtime.coordinator import Coordinator
from adadecode.runtime.exit_heads import ExitHeads
from adadecode.runtime.hf_adapter import ModelArgs, load_hf_config, load_stage_modules
from adadecode.runtime.model_runner import StageModel
from adadecode.runtime.runners.inprocess import LocalRunner
from adadecode.runtime.stopping import StopCriteria
from helpers import InProcessPipeline, save_tiny_model
from torch._dynamo.utils import counters

PROMPTS = [[5, 17, 33, 2, 9, 41, 7], [1, 2], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
HEAD_LAYERS = [2, 3, 5]
TINY_MODEL_SEED = 2  # the weights of conftest.model_dir


def random_heads(stages, seed: int = 0, threshold: float = 0.05) -> ExitHeads:
    """Heads with random T: confident often and mostly wrong, so rollbacks are frequent."""
    last = stages[-1].model.modules
    d = last.norm.weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    transforms = {l: torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) for l in HEAD_LAYERS}
    manifest = {"default_layers": HEAD_LAYERS, "default_thresholds": {str(l): threshold for l in HEAD_LAYERS}}
    return ExitHeads(transforms, last.norm, last.lm_head.weight, None, {l: threshold for l in HEAD_LAYERS}, manifest)


def decode(pipe: InProcessPipeline, policy: str, max_inflight: int = 2, max_new_tokens: int = 20) -> list[list[int]]:
    out = []
    for stage in pipe.stages:
        stage.policy = policy
    for prompt in PROMPTS:
        coord = Coordinator(max_inflight=0 if policy == "off" else max_inflight)
        seq = pipe._seq
        pipe._seq += 1
        coord.add_sequence(seq, prompt, StopCriteria(max_new_tokens))
        LocalRunner(pipe.stages).run(coord)
        out.append(coord.sequences[seq].generated)
    return out


def pipeline(path, ranges, heads: bool, compiled: str | None, max_chunk: int = 3) -> InProcessPipeline:
    pipe = InProcessPipeline(path, ranges)
    if heads:
        h = random_heads(pipe.stages)
        for stage in pipe.stages:
            stage.heads = h
    if compiled:
        for stage in pipe.stages:
            layers = [l for l in HEAD_LAYERS if heads]
            stage.model.step = CompiledStep(stage.model, layers, max_chunk, backend=compiled, autotune=False)
    return pipe


def test_traced_step_gives_the_eager_tokens_and_never_recompiles(model_dir):
    eager = pipeline(model_dir, [(0, 6)], heads=True, compiled=None)
    traced = pipeline(model_dir, [(0, 6)], heads=True, compiled="eager")
    for policy in ("off", "eager", "deferred"):
        assert decode(traced, policy) == decode(eager, policy), policy
    assert sum(s.stats.merged for s in traced.stages) > 0  # 2- and 3-row chunks were compiled too
    graphs = counters["stats"]["unique_graphs"]
    longer = decode(traced, "deferred", max_new_tokens=40)  # new positions, new lengths
    assert counters["stats"]["unique_graphs"] == graphs, "a longer sequence recompiled a segment"
    assert longer == decode(eager, "deferred", max_new_tokens=40)


def test_after_the_warm_up_nothing_compiles(model_dir):
    """``warm_up`` (at load) compiles every graph decoding calls; a later stage's input, received
    from another rank outside inference mode, must not recompile them (dynamo guards on the
    tensor's dispatch keys), nor may the positions or the lengths."""
    config = load_hf_config(model_dir)
    model = StageModel(load_stage_modules(model_dir, config, 2, 6, embed=False, head=True),
                       ModelArgs.from_hf_config(config), 32)
    model.step = CompiledStep(model, [4], max_chunk=3, backend="eager")
    model.step.merges_rows = True  # as inductor's C++ GEMM template allows
    model.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    hidden = torch.randn(14, config.hidden_size, generator=torch.Generator().manual_seed(3))  # not an inference tensor
    model.run_layers(hidden[:4], 0, 2, 6)  # a prompt longer than max_chunk: eager
    for a, b in ((4, 5), (5, 7), (7, 10), (10, 11), (11, 14)):
        out = model.run_layers(hidden[a:b], a, 2, 6, parts=(1,) * (b - a))
        model.greedy_tokens(out)
        model.greedy_tokens(out.clone())  # made outside inference mode, as a caller's tensor may be
    assert counters["stats"]["unique_graphs"] == graphs, "a graph compiled after the warm-up"


def test_traced_pipeline_of_three_stages(model_dir):
    ranges = [(0, 2), (2, 4), (4, 6)]
    eager = pipeline(model_dir, ranges, heads=True, compiled=None)
    traced = pipeline(model_dir, ranges, heads=True, compiled="eager")
    assert decode(traced, "eager") == decode(eager, "eager")


def test_segments_follow_the_head_layers(model_dir):
    pipe = pipeline(model_dir, [(0, 3), (3, 6)], heads=True, compiled="eager")
    assert pipe.stages[0].model.step.segments == [(0, 2), (2, 3)]  # local layers: cut at head 2
    assert pipe.stages[1].model.step.segments == [(0, 2), (2, 3)]  # global 3..5, cut at head 5
    with pytest.raises(RuntimeError, match="do not fall on the compiled segments"):
        pipe.stages[0].model.step(torch.zeros(1, 64), 0, 0, 1, 0)


def test_prefills_longer_than_the_largest_chunk_run_eagerly(model_dir):
    pipe = pipeline(model_dir, [(0, 6)], heads=False, compiled="eager", max_chunk=2)
    step = pipe.stages[0].model.step
    assert step.handles(2) and not step.handles(3)
    decode(pipe, "off", max_new_tokens=3)
    assert {s for _, s in step._seen} <= {1, 2}


def test_auto_compiles_on_cuda_only(model_dir):
    pipe = InProcessPipeline(model_dir, [(0, 6)])
    model = pipe.stages[0].model
    assert not maybe_compile(model, "auto") and model.step is None  # CPU: the exact eager path
    assert not maybe_compile(model, "off")
    assert maybe_compile(model, "on") and isinstance(model.step, CompiledStep)


def test_inductor_early_exit_changes_nothing(model_dir):
    """Invariant 4 with real compiled kernels: eager backfill gives the tokens of early exit off
    on the same compiled stages (the segment cut is the same either way)."""
    pipe = pipeline(model_dir, [(0, 6)], heads=True, compiled="inductor", max_chunk=1)
    off = decode(pipe, "off", max_new_tokens=12)
    assert decode(pipe, "eager", max_new_tokens=12) == off
    assert sum(s.stats.early_exits.get(l, 0) for s in pipe.stages for l in HEAD_LAYERS) > 0
    assert pipe.stages[0].model.step.compile_s > 0
    eager = decode(pipeline(model_dir, [(0, 6)], heads=False, compiled=None), "off", max_new_tokens=12)
    # fused kernels round differently: on this tiny fp32 model the tokens still agree
    assert sum(a == b for x, y in zip(off, eager) for a, b in zip(x, y)) >= 0.9 * sum(map(len, eager))


@pytest.mark.parametrize("model_type", ["phi3", "qwen3_moe", "gemma3_text"])
def test_other_families_trace_to_the_eager_tokens(tmp_path, model_type):
    path = save_tiny_model(tmp_path, model_type, seed=TINY_MODEL_SEED)
    ranges = [(0, 3), (3, 6)]
    eager = pipeline(path, ranges, heads=True, compiled=None)
    traced = pipeline(path, ranges, heads=True, compiled="eager")
    for policy in ("off", "eager"):
        assert decode(traced, policy, max_new_tokens=10) == decode(eager, policy, max_new_tokens=10), policy
    assert sum(s.stats.early_exits.get(l, 0) for s in traced.stages for l in HEAD_LAYERS) > 0


def test_mixture_of_experts_compiles_with_inductor(tmp_path):
    """The experts block through inductor's real kernels (its grouped GEMM falls back to
    transformers' own op under compile in fp32)."""
    path = save_tiny_model(tmp_path, "qwen3_moe", seed=TINY_MODEL_SEED)
    pipe = pipeline(path, [(0, 6)], heads=False, compiled="inductor", max_chunk=1)
    compiled = decode(pipe, "off", max_new_tokens=8)
    assert pipe.stages[0].model.step.compile_s > 0
    eager = decode(pipeline(path, [(0, 6)], heads=False, compiled=None), "off", max_new_tokens=8)
    # fused kernels round differently: on this tiny fp32 model the tokens still agree
    assert sum(a == b for x, y in zip(compiled, eager) for a, b in zip(x, y)) >= 0.9 * sum(map(len, eager))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_merged_chunk_is_one_call_with_the_one_row_graphs_bits(model_dir, dtype):
    """Inductor as the runtime runs it (frozen weights, the C++ GEMM template): 2 to 4 decode rows
    of a merged chunk (a deferred backfill with the next token, or a token with its lookup drafts)
    run as one call (attention per row, the GEMMs, norms and MLP over all rows),
    each row with the bits the one-row graph gives it, layers and LM head. ``CompiledStep`` checks
    each graph against the one-row graph on its first call and falls back to row by row where they
    differ (``unmerged``): here none may. ``warm_up`` compiles every graph first (as loading does),
    so nothing compiles after it. One layer, to keep the compile short."""
    config = load_hf_config(model_dir)
    modules = load_stage_modules(model_dir, config, 0, 1, embed=False, head=True, dtype=dtype)
    model = StageModel(modules, ModelArgs.from_hf_config(config), 20)
    model.step = CompiledStep(model, [], max_chunk=4)
    assert model.warm_up() > 0
    compiled = set(model.step._seen)
    hidden = torch.randn(17, config.hidden_size, generator=torch.Generator().manual_seed(6)).to(dtype)
    model.run_layers(hidden[:5], 0, 0, 1)  # a prompt longer than max_chunk: eager, nothing to compile
    plain = [model.run_layers(hidden[i : i + 1], i, 0, 1) for i in range(5, 17)]
    tokens = [t for h in plain for t in model.greedy_tokens(h)]
    model.reset(0)
    model.run_layers(hidden[:5], 0, 0, 1)
    cuts = ((5, 7), (7, 10), (10, 14), (14, 17))
    merged = [model.run_layers(hidden[a:b], a, 0, 1, parts=(1,) * (b - a)) for a, b in cuts]
    out = torch.cat(merged)  # the last chunk: the 3-row graph again, checked on its first call
    assert [t for a, b in cuts for t in model.greedy_tokens(out[a - 5 : b - 5])] == tokens
    assert torch.equal(out, torch.cat(plain))
    assert not model.step.unmerged, "a compiled merged chunk is no longer row-invariant (see docs/exactness.md)"
    assert model.step.checked == {((0, 1), n) for n in (2, 3, 4)} | {("head", n) for n in (2, 3, 4)}
    assert model.step._seen == compiled, "a graph compiled after the warm-up"


def test_a_merged_graph_that_differs_from_the_one_row_graph_runs_row_by_row(model_dir):
    """The check on a merged graph's first call: one that does not give a row the one-row graph's
    bits (here made to, by a last-bit change) is dropped, and its rows get the one-row graph's
    bits then and on every later call."""
    config = load_hf_config(model_dir)
    model = StageModel(load_stage_modules(model_dir, config, 0, 2, embed=False, head=False),
                       ModelArgs.from_hf_config(config), 16)
    model.step = step = CompiledStep(model, [], max_chunk=3, backend="eager")
    step.merges_rows = True  # as inductor's C++ GEMM template allows
    segment = step._segment

    def off_by_a_bit(a, b, per_row=False):
        fn = segment(a, b, per_row)
        return (lambda *args: torch.nextafter(fn(*args), torch.tensor(1.0))) if per_row else fn

    step._segment = off_by_a_bit
    hidden = torch.randn(10, config.hidden_size, generator=torch.Generator().manual_seed(7))
    model.run_layers(hidden[:4], 0, 0, 2)
    plain = torch.cat([model.run_layers(hidden[i : i + 1], i, 0, 2) for i in range(4, 10)])
    model.reset(0)
    model.run_layers(hidden[:4], 0, 0, 2)
    chunks = ((4, 6), (6, 8), (8, 10))  # the second and third: after the check dropped the graph
    merged = torch.cat([model.run_layers(hidden[a:b], a, 0, 2, parts=(1,) * (b - a)) for a, b in chunks])
    assert torch.equal(merged, plain)
    assert step.unmerged == {((0, 2), 2)} and not step.checked


@pytest.mark.parametrize(
    "max_chunk, max_rows, buckets",
    [(3, 0, [2, 3]), (2, 0, [2]), (2, 2, [2, 3]), (3, 4, [2, 3, 4]), (3, 8, [2, 3, 4]), (5, 8, [2, 3, 4, 5])],
)
def test_per_row_graphs_cover_every_piece_a_batch_splits_into(max_chunk, max_rows, buckets):
    """Graphs for every row count up to a merged chunk's rows and a fused batch's (at most
    FUSED_ROWS); every batch splits into as few and as even pieces as can be, in order, none of
    them a single row (which has no per-row graph)."""
    assert row_buckets(max_chunk, max_rows) == buckets and FUSED_ROWS == 4
    step = CompiledStep.__new__(CompiledStep)  # only the splitting: no model, nothing compiled
    step.buckets = buckets
    most = max_chunk if max_rows < 2 else 3 * max(max_chunk, max_rows)  # without fused batches, a merged chunk
    pieces: list[list[int]] = []

    def run(hidden, rows):
        pieces.append(rows)
        return hidden

    for n in range(2, most + 1):
        pieces.clear()
        hidden = torch.arange(n, dtype=torch.float32)[:, None]
        assert torch.equal(step._bucketed(run, hidden, list(range(n))), hidden)
        assert [r for piece in pieces for r in piece] == list(range(n))
        sizes = [len(piece) for piece in pieces]
        assert all(size in buckets for size in sizes), (n, sizes)
        assert len(sizes) == -(-n // buckets[-1]) and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="1 row"):
        step._bucketed(lambda hidden, rows: hidden, torch.zeros(1, 1), [0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compiled_fused_batch_gives_every_sequence_its_bits_alone(model_dir, dtype):
    """``serve.batching: fused`` on a compiled CPU stage: the decode rows of several sequences, each
    at its own position of its own slot, run as one call (``CompiledStep.rows``), and every row
    gets the bits the one-row graph gives it alone, layers and LM head: at every batch size, one
    over the largest graph (in pieces), and with a merged chunk's rows among them. The warm-up
    compiles every graph first, a decode row on a second slot included, so nothing compiles
    after it."""
    config = load_hf_config(model_dir)
    modules = load_stage_modules(model_dir, config, 0, 1, embed=False, head=True, dtype=dtype)
    slots = 5
    model = StageModel(modules, ModelArgs.from_hf_config(config), 24, num_slots=slots)
    maybe_compile(model, "on", max_chunk=3, max_rows=slots)
    assert model.step.buckets == [2, 3, 4]  # FUSED_ROWS: 5 rows run in pieces
    assert model.warm_up() > 0
    compiled = set(model.step._seen)
    gen = torch.Generator().manual_seed(8)
    prompts = [torch.randn(4 + s, config.hidden_size, generator=gen).to(dtype) for s in range(slots)]
    steps = [torch.randn(6, config.hidden_size, generator=gen).to(dtype) for _ in range(slots)]

    def prefill():
        for s, prompt in enumerate(prompts):
            model.reset(s)
            model.run_layers(prompt, 0, 0, 1, s)

    prefill()  # each sequence alone: plain decoding, one row at a time
    alone = [[model.run_layers(steps[s][i : i + 1], 4 + s + i, 0, 1, s) for i in range(6)] for s in range(slots)]
    tokens = [[model.greedy_tokens(h)[0] for h in hs] for hs in alone]
    prefill()
    done = [0] * slots  # rows of each sequence through the batched calls so far
    got: list[list[torch.Tensor]] = [[] for _ in range(slots)]
    got_tokens: list[list[int]] = [[] for _ in range(slots)]
    # batches of 5 (every slot: over the largest graph, in pieces), 4, 3, 2 with a merged chunk of
    # 2 rows (3 rows), 4 with a merged chunk of 3 rows (6 rows: over the largest graph, in pieces)
    for batch, merged in (([0, 1, 2, 3, 4], {}), ([0, 1, 2, 3], {}), ([0, 2, 4], {}), ([1, 3], {1: 2}),
                          ([0, 1, 2, 4], {2: 3})):
        rows = {s: merged.get(s, 1) for s in batch}
        chunks = [(steps[s][done[s] : done[s] + rows[s]], 4 + s + done[s], s) for s in batch]
        outs = model.run_layers_batch(chunks, 0, 1, exact=False, parts=[(1,) * rows[s] for s in batch])
        tokens_out = model.greedy_tokens(torch.cat(outs))
        at = 0
        for s, out in zip(batch, outs):
            got[s] += list(out.split(1))
            got_tokens[s] += tokens_out[at : at + rows[s]]
            at += rows[s]
            done[s] += rows[s]
    for s in range(slots):
        n = done[s]
        assert torch.equal(torch.cat(got[s]), torch.cat(alone[s][:n])), f"sequence {s}"
        assert got_tokens[s] == tokens[s][:n]
    assert not model.step.unmerged, "a compiled fused batch is no longer row-invariant (see docs/exactness.md)"
    assert model.step._seen == compiled, "a graph compiled after the warm-up"
