"""The serving loop (runtime/serving.py) in process, on a tiny random model: many requests in
flight through one pipeline give each prompt's tokens decoded alone; slots, queue and
cancellation behave; a failure ends the requests in flight and serving goes on.

The HTTP server on top of it is tested in tests/test_server.py; two ranks in
tests/test_distributed.py.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from adadecode.runtime.serving import (
    Finished,
    QueueFull,
    Request,
    RequestTooLong,
    ServingLoop,
    TextDelta,
)
from helpers import make_engine

PROMPTS = [[5, 17, 3, 42, 8, 11], [1, 2, 3], [60, 61, 62, 63, 64, 65, 66], [9], [30, 31, 32, 33], [7, 7, 7, 7, 7]]
MAX_NEW = 12
THREE = [(0, 2), (2, 4), (4, 6)]
TINY_MODEL_SEED = 3  # the weights of conftest.model_dir


@pytest.fixture(scope="module")
def alone(model_dir):
    """Each prompt decoded alone, in every mode (the same tokens: early exit changes nothing)."""
    engine = make_engine(model_dir, [(0, 6)])
    return [engine.generate(p, max_new_tokens=MAX_NEW).tokens for p in PROMPTS]


class Collector:
    """Events per request id, and a barrier for 'every request has finished'."""

    def __init__(self, expected: int):
        self.events: dict[int, list] = {}
        self.done = threading.Semaphore(0)
        self.expected = expected

    def __call__(self, event) -> None:
        self.events.setdefault(event.id, []).append(event)
        if isinstance(event, Finished):
            self.done.release()

    def wait(self, timeout_s: float = 60.0) -> None:
        for _ in range(self.expected):
            assert self.done.acquire(timeout=timeout_s), "a request never finished"

    def finished(self, rid: int) -> Finished:
        (end,) = [e for e in self.events[rid] if isinstance(e, Finished)]
        return end


def serve(model_dir, ranges, slots: int, **kw) -> ServingLoop:
    engine = make_engine(model_dir, ranges, num_slots=slots)
    return ServingLoop(engine, max_num_seqs=slots, **kw).start()


def assert_each_prompt_gives_its_tokens_alone(loop: ServingLoop, early_exit: str, alone) -> None:
    """Submit every prompt at once with ``early_exit``; each streams the tokens it gives alone."""
    got = Collector(len(PROMPTS))
    ids = [loop.submit(Request(tuple(p), MAX_NEW, early_exit=early_exit), got) for p in PROMPTS]
    got.wait()
    for rid, ref in zip(ids, alone):
        assert [t for e in got.events[rid] if isinstance(e, TextDelta) for t in e.tokens] == ref


def assert_all_free(loop: ServingLoop) -> None:
    m = loop.metrics()
    assert m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0
    for stage in loop.engine.stages:
        assert stage.slots == {} and not stage.queued and not stage.parked, stage.index


@pytest.mark.parametrize("below", [None, 2], ids=["heads-always", "heads-below-2"])
@pytest.mark.parametrize("ranges", [[(0, 6)], THREE], ids=["1-stage", "3-stages"])
@pytest.mark.parametrize("mode", ["off", "eager", "deferred"])
def test_many_requests_in_flight_give_each_prompts_tokens_alone(model_dir, alone, ranges, mode, below):
    """``below`` 2: the load rule switches heads off while 2 or more sequences run, and on
    again for the last one (Coordinator.early_exit_below; every switch, both ways and
    mid-sequence, is exercised by tests/test_random_pipeline.py)."""
    loop = serve(model_dir, ranges, slots=4, early_exit_below=below)
    try:
        got = Collector(3 * len(PROMPTS))
        ids = [loop.submit(Request(tuple(p), MAX_NEW, early_exit=mode), got) for p in PROMPTS * 3]
        got.wait()
        for rid, prompt_index in zip(ids, list(range(len(PROMPTS))) * 3):
            end = got.finished(rid)
            assert end.reason in ("length", "eos") and end.completion_tokens == len(alone[prompt_index])
            deltas = [e for e in got.events[rid] if isinstance(e, TextDelta)]
            tokens = [t for d in deltas for t in d.tokens]
            text = "".join(d.text for d in deltas) + end.text
            assert text == loop.engine._decode(alone[prompt_index])
            assert tokens == alone[prompt_index][: len(tokens)]
        assert_all_free(loop)
        m = loop.metrics()
        assert m["generation_tokens_total"] == 3 * sum(map(len, alone))
        assert m["requests_finished"].get("length", 0) + m["requests_finished"].get("eos", 0) == 3 * len(PROMPTS)
        if mode != "off" and below is None:  # with the rule, 4 slots are rarely down to one sequence
            assert sum(m["early_emitted"].values()) > 0
            settled = sum(m["early_accepted"].values()) + sum(m["early_rejected"].values())
            assert settled <= sum(m["early_emitted"].values())
    finally:
        loop.stop()


def test_the_load_rule_turns_heads_off_while_the_pipeline_is_full(model_dir, alone):
    """early_exit_below=1: one running sequence already fills the pipeline, so eager requests
    run without heads (none evaluated, no early token) and give their tokens alone."""
    loop = serve(model_dir, THREE, slots=4, early_exit_below=1)
    try:
        assert_each_prompt_gives_its_tokens_alone(loop, "eager", alone)
        assert sum(stage.stats.head_evals for stage in loop.engine.stages) == 0
        assert sum(loop.metrics()["early_emitted"].values()) == 0
    finally:
        loop.stop()


def test_where_no_head_pays_early_exit_requests_are_served_as_off(model_dir, alone):
    """A per-setting head choice of none (runtime/sim/heads.py): requests asking for early
    exit are taken and decoded as off, not refused."""
    from adadecode.runtime.sim.heads import HeadChoice

    engine = make_engine(model_dir, THREE, num_slots=2)
    engine.heads_choice = HeadChoice((), (), 0.95, "no exit head setting is predicted to pay")
    for stage in engine.stages:
        stage.heads = None  # what loading does when the choice is none
    loop = ServingLoop(engine, max_num_seqs=2).start()
    try:
        assert_each_prompt_gives_its_tokens_alone(loop, "deferred", alone)
        assert sum(loop.metrics()["early_emitted"].values()) == 0
    finally:
        loop.stop()


def test_never_more_sequences_than_slots(model_dir):
    loop = serve(model_dir, THREE, slots=2)
    seen = []
    real = loop.admit

    def admit(coord):
        real(coord)
        seen.append(max(len(s.slots) for s in loop.engine.stages))

    loop.admit = admit
    try:
        got = Collector(len(PROMPTS))
        for p in PROMPTS:
            loop.submit(Request(tuple(p), MAX_NEW), got)
        got.wait()
        assert max(seen) <= 2
    finally:
        loop.stop()


def test_bad_requests_are_refused_with_the_numbers(model_dir):
    loop = serve(model_dir, [(0, 6)], slots=1, max_queue=2)
    try:
        with pytest.raises(
            RequestTooLong, match=r"prompt \(6 tokens\) plus max_tokens \(60\) needs 66 positions.*holds 64"
        ):
            loop.submit(Request(tuple(PROMPTS[0]), 60), print)
        with pytest.raises(ValueError, match="early_exit `sometimes` is unknown"):
            loop.submit(Request((1,), 4, early_exit="sometimes"), print)
        with pytest.raises(ValueError, match="prompt is empty"):
            loop.submit(Request((), 4), print)
        with pytest.raises(ValueError, match="sampling must be a SamplingParams or None, not dict"):
            loop.submit(Request((1,), 4, sampling={"temperature": 0.8}), print)
        # one running (it takes a while), two queued, the fourth is refused
        got = Collector(3)
        gate = threading.Event()
        real = loop.engine.stages[0].model.run_layers
        loop.engine.stages[0].model.run_layers = lambda *a, **k: (gate.wait(10), real(*a, **k))[1]
        loop.submit(Request(tuple(PROMPTS[1]), 4), got)
        deadline = time.monotonic() + 10
        while loop.metrics()["num_requests_running"] < 1:  # admitted, and held inside the model
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(2):
            loop.submit(Request(tuple(PROMPTS[1]), 4), got)
        with pytest.raises(QueueFull, match="2 requests are waiting"):
            loop.submit(Request(tuple(PROMPTS[1]), 4), got)
        gate.set()
        got.wait()
        assert_all_free(loop)
    finally:
        loop.stop()


def test_a_cancelled_request_frees_its_slot_and_the_others_go_on(model_dir, alone):
    loop = serve(model_dir, THREE, slots=2)
    try:
        got = Collector(3)
        first = threading.Event()

        def on_event(event):
            got(event)
            if isinstance(event, TextDelta) and event.id == victim:
                first.set()

        victim = loop.submit(Request(tuple(PROMPTS[0]), 40 - len(PROMPTS[0])), on_event)
        queued = loop.submit(Request(tuple(PROMPTS[1]), MAX_NEW), on_event)
        queued_too = loop.submit(Request(tuple(PROMPTS[2]), MAX_NEW), on_event)
        assert first.wait(30)
        loop.cancel(victim)
        got.wait()
        assert got.finished(victim).reason == "cancelled"
        assert got.finished(queued).completion_tokens == len(alone[1])
        assert got.finished(queued_too).completion_tokens == len(alone[2])
        assert_all_free(loop)
    finally:
        loop.stop()


def test_a_failure_ends_the_requests_in_flight_and_serving_goes_on(model_dir, alone):
    loop = serve(model_dir, [(0, 6)], slots=2)
    try:
        model = loop.engine.stages[0].model
        calls = []

        def failing(real):
            def call(*a, **k):
                calls.append(1)
                if len(calls) == 5:
                    raise RuntimeError("the model failed")
                return real(*a, **k)

            return call

        model.run_layers, model.run_layers_batch = failing(model.run_layers), failing(model.run_layers_batch)
        got = Collector(2)
        ids = [loop.submit(Request(tuple(p), MAX_NEW), got) for p in PROMPTS[:2]]
        got.wait()
        for rid in ids:
            end = got.finished(rid)
            assert end.reason == "failed" and "RuntimeError: the model failed" in end.error
        assert loop.healthy
        got = Collector(1)
        rid = loop.submit(Request(tuple(PROMPTS[3]), MAX_NEW), got)
        got.wait()
        assert got.finished(rid).completion_tokens == len(alone[3])
        assert_all_free(loop)
    finally:
        loop.stop()


def test_with_a_compiled_step_exact_batches_run_each_sequence_through_it(model_dir):
    """A compiled step's kernels round otherwise than the eager layers: an exact batch must run
    each sequence through the step, as run_layers does alone, never the eager layers."""
    from adadecode.runtime.hf_adapter import ModelArgs, load_hf_config, load_stage_modules
    from adadecode.runtime.model_runner import StageModel

    config = load_hf_config(model_dir)
    model = StageModel(load_stage_modules(model_dir, config, 0, 6, embed=True, head=False),
                       ModelArgs.from_hf_config(config), 64, num_slots=2)

    class RecordingStep:  # stands in for CompiledStep: the same call, recorded
        calls: list = []

        def handles(self, seqlen):
            return True

        def __call__(self, hidden, input_pos, a, b, slot, rows_alone=False):
            self.calls.append((input_pos, hidden.shape[0], slot))
            return model._layers(hidden, input_pos, a, b, slot)

    model.step = RecordingStep()
    chunks = [(torch.randn(3, model.args.hidden_size), 0, 0), (torch.randn(2, model.args.hidden_size), 0, 1)]
    model.run_layers_batch(chunks, 0, 6, exact=True)
    assert model.step.calls == [(0, 3, 0), (0, 2, 1)]
    assert [model.cache.lengths[li] for li in range(6)] == [[3, 2]] * 6


def test_batching_auto_fuses_only_where_a_compiled_step_keeps_each_rows_bits(model_dir):
    """serve.batching: auto is fused where the stage's compiled step runs a batch's decode rows in one
    call with each row's own bits (StageModel.merges_rows: a compiled step that merges rows, on the
    CPU, and row_invariant auto), exact everywhere else: the eager row-invariant fused path is
    slower than exact on this CPU."""
    from types import SimpleNamespace

    from adadecode.runtime.hf_adapter import ModelArgs, load_hf_config, load_stage_modules
    from adadecode.runtime.loading import LoadSpec
    from adadecode.runtime.model_runner import StageModel

    config = load_hf_config(model_dir)
    model = StageModel(load_stage_modules(model_dir, config, 0, 1, embed=False, head=False),
                       ModelArgs.from_hf_config(config), 16)
    auto = LoadSpec(batching="auto")
    assert auto.exact_batches(model)  # eager
    model.step = SimpleNamespace(merges_rows=False)
    assert auto.exact_batches(model)
    model.step = SimpleNamespace(merges_rows=True)
    assert not auto.exact_batches(model)
    model.row_invariant = "on"  # every row its own call
    assert auto.exact_batches(model)
    model.row_invariant = "auto"
    assert LoadSpec(batching="exact").exact_batches(model)
    model.step = None
    assert not LoadSpec(batching="fused").exact_batches(model)
    with pytest.raises(ValueError, match="batching `mixed` is unknown; use one of auto, exact, fused"):
        LoadSpec(batching="mixed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_batched_call_gives_each_sequence_its_own_result(model_dir, dtype):
    """StageModel.run_layers_batch on the real layers, three sequences of different lengths and
    chunk sizes in their own slots: exact batching gives the bits of each sequence run alone (the
    default, serve.batching: exact), fused batching the same values up to rounding; every slot's
    cache holds what running alone wrote."""
    from adadecode.runtime.hf_adapter import (
        ModelArgs,
        load_hf_config,
        load_stage_modules,
    )
    from adadecode.runtime.model_runner import StageModel

    config = load_hf_config(model_dir)
    args = ModelArgs.from_hf_config(config)

    def model():
        modules = load_stage_modules(model_dir, config, 0, 6, embed=True, head=False, dtype=dtype)
        return StageModel(modules, args, 64, num_slots=3)

    torch.manual_seed(0)
    prompts = [torch.randn(n, args.hidden_size, dtype=dtype) for n in (5, 9, 2)]
    steps = [torch.randn(n, args.hidden_size, dtype=dtype) for n in (1, 3, 2)]  # chunk sizes 1..max_inflight+1
    alone, ref = model(), []
    for slot, (p, x) in enumerate(zip(prompts, steps)):
        alone.run_layers(p, 0, 0, 6, slot)
        ref.append(alone.run_layers(x, len(p), 0, 6, slot))
    for exact in (True, False):
        batched = model()
        for slot, p in enumerate(prompts):
            batched.run_layers(p, 0, 0, 6, slot)
        out = batched.run_layers_batch([(x, len(p), slot) for slot, (p, x) in enumerate(zip(prompts, steps))],
                                       0, 6, exact=exact)
        for slot, (o, r) in enumerate(zip(out, ref)):
            if exact:
                assert torch.equal(o, r), slot
            else:
                tol = 0.05 if dtype == torch.bfloat16 else 1e-5
                torch.testing.assert_close(o, r, rtol=tol, atol=tol)
        for li in range(6):
            assert batched.cache.lengths[li] == alone.cache.lengths[li] == [6, 12, 4]
            if exact:
                assert torch.equal(batched.cache.k[li], alone.cache.k[li])
                assert torch.equal(batched.cache.v[li], alone.cache.v[li])


@pytest.mark.parametrize("mode", ["off", "eager", "deferred"])
def test_ignore_eos_and_min_tokens_act_on_verified_tokens(model_dir, alone, mode):
    """A token of the prompt's output made EOS: it ends the request, unless ``ignore_eos`` (then
    the request runs to its length) or before ``min_tokens`` (then it is an ordinary token, and
    so is a stop string before it, which is output). With early tokens emitted and rolled back,
    every count and text is that rule applied to the tokens the prompt gives alone."""
    loop = serve(model_dir, THREE, slots=4)
    try:
        ref = alone[0]
        eos = max(ref, key=ref.count)
        assert ref.count(eos) >= 2  # so that it ends the request after min_tokens too
        k = ref.index(eos)  # EOS first comes as token k + 1
        loop.engine.eos_token_ids = frozenset({eos})
        text, letter = loop.engine._decode(ref), loop.engine._decode([ref[k]])  # one letter per token
        m = k + 2
        eos_after_m = next((n for n in range(m, len(ref) + 1) if ref[n - 1] == ref[k]), None)
        cut = text.find(letter, m - 1)  # a stop string counts when it ends past the first m - 1 tokens' text
        cases = {
            "plain": (Request(tuple(PROMPTS[0]), MAX_NEW, early_exit=mode), ("eos", k + 1, text[: k + 1])),
            "ignore_eos": (Request(tuple(PROMPTS[0]), MAX_NEW, early_exit=mode, ignore_eos=True),
                           ("length", MAX_NEW, text)),
            "min_tokens": (Request(tuple(PROMPTS[0]), MAX_NEW, early_exit=mode, min_tokens=m),
                           ("eos", eos_after_m, text[:eos_after_m]) if eos_after_m else ("length", MAX_NEW, text)),
            "stop+min_tokens": (Request(tuple(PROMPTS[0]), MAX_NEW, stop=(letter,), early_exit=mode, min_tokens=m,
                                        ignore_eos=True),
                                ("stop", cut + 1, text[:cut]) if cut >= 0 else ("length", MAX_NEW, text)),
        }
        got = Collector(len(cases))
        ids = {name: loop.submit(request, got) for name, (request, _) in cases.items()}
        got.wait()
        for name, (_, (reason, count, out)) in cases.items():
            events = got.events[ids[name]]
            end = got.finished(ids[name])
            tokens = [t for e in events if isinstance(e, TextDelta) for t in e.tokens]
            assert (end.reason, end.completion_tokens, tokens) == (reason, count, ref[:count]), name
            assert "".join(e.text for e in events) == out, name
        # the rule was put to work: EOS and the stop string come again after min_tokens and stop there
        assert eos_after_m is not None and cut >= 0 and letter in cases["stop+min_tokens"][1][2]
        with pytest.raises(ValueError, match=r"min_tokens \(13\) must be in \[0, max_tokens = 12\]"):
            loop.submit(Request(tuple(PROMPTS[0]), MAX_NEW, min_tokens=13), got)
        assert_all_free(loop)
    finally:
        loop.stop()
