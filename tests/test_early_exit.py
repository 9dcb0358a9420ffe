"""Early exit on the real bundled model: eager and deferred backfill, forced rollbacks, and
stops (EOS emitted early on every stage, max_new_tokens, stop strings) all give exactly the
tokens of plain greedy decoding. scripts/parity.py runs the large version (32 x 256).

Eager backfill equal to greedy is a rule (docs/design.md, invariant 4). Deferred backfill equal to
greedy is not: a merged chunk changes the floating-point reduction order, and here it happens
to give the same tokens because the model runs in fp32 on this CPU. The tests still assert it,
as that CPU fp32 property, and assert its premise with it: that merged chunks really ran
(``merged_chunks``), or the deferred runs would only repeat the eager ones."""

from __future__ import annotations

import pytest
import torch
from adadecode.launcher.bench import first_divergence, hf_generate
from adadecode.runtime import coordinator as coordinator_module
from adadecode.runtime.draft_table import bundled_table_path, load_draft_table
from adadecode.runtime.engine import Engine
from adadecode.runtime.exit_heads import ExitHeads
from adadecode.runtime.prompts import select_prompts
from adadecode.runtime.run_stats import GenerationStats
from helpers import bundled_model_dir

pytestmark = pytest.mark.slow  # the bundled model, for many tokens

MAX_NEW_TOKENS = 20
MODES = ("eager", "deferred")


def untrained_heads(engine: Engine, layers, threshold: float = 0.0) -> ExitHeads:
    """Heads at initialisation (T = identity): the frozen LM head on the raw hidden state.

    They agree with the final layer rarely, so with a low threshold nearly every early token
    is rolled back: the hardest case for verification. They score the 4096 lowest token ids
    (byte-level BPE puts the common tokens there) to keep the tests quick."""
    last = engine.stages[-1].model.modules
    eye = torch.eye(engine.args.hidden_size)
    vocab = torch.arange(4096, dtype=torch.int32)
    manifest = {"default_layers": list(layers), "default_thresholds": {str(l): threshold for l in layers}}
    return ExitHeads({l: eye for l in layers}, last.norm, last.lm_head.weight[:4096].contiguous(), vocab,
                     {l: threshold for l in layers}, manifest)


def merged_chunks(engine: Engine) -> int:
    """Deferred backfills that ran as one chunk with a later token, so far, over all stages."""
    return sum(stage.stats.merged for stage in engine.stages)


def with_heads(engine: Engine, heads: ExitHeads) -> Engine:
    for stage in engine.stages:
        stage.heads = heads
    return engine


@pytest.fixture(scope="module")
def engines():
    bundled_model_dir()
    return {p: Engine.load("bundled:smollm2-135m-instruct", stages=p, heads=None) for p in (1, 2, 3)}


@pytest.fixture(scope="module")
def cases(engines):
    from transformers import AutoModelForCausalLM

    engine = engines[1]
    hf = AutoModelForCausalLM.from_pretrained(str(engine.resolved.path), dtype=torch.float32).eval()
    eos = sorted(engine.eos_token_ids)
    out = []
    for prompt in select_prompts("data/prompts/heldout.jsonl", 2):
        ids = engine.encode(prompt, chat=isinstance(prompt, list))
        out.append((ids, hf_generate(hf, ids, MAX_NEW_TOKENS, eos)[0]))
    return out


def boundary_layers(engine: Engine) -> list[int]:
    """A head in the middle of every stage and one at every stage boundary."""
    layers = {(a + b) // 2 for a, b in engine.layer_ranges} | {b for _, b in engine.layer_ranges[:-1]}
    return sorted(layers)


def staggered_heads(engine: Engine) -> ExitHeads:
    """Untrained heads on every stage: all confident-only but the deepest, which always exits,
    so that early tokens come from every stage and most of them are wrong."""
    layers = boundary_layers(engine)
    heads = untrained_heads(engine, layers)
    return heads.select(layers, {l: 0.0 if l == layers[-1] else 0.85 for l in layers})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_forced_rollbacks_still_match_plain_greedy(engines, cases, stages, mode):
    engine = with_heads(engines[stages], staggered_heads(engines[stages]))
    rollbacks = accepted = 0
    exit_stages = set()
    merged = merged_chunks(engine)
    for ids, ref in cases:
        res = engine.generate(ids, max_new_tokens=MAX_NEW_TOKENS, early_exit=mode)
        at = first_divergence(res.tokens, ref)
        # for deferred: the CPU fp32 property (module docstring), not a rule
        assert at is None, f"{stages} stages, {mode}: diverges at {at}: {res.tokens[at:at + 3]} vs {ref[at:at + 3]}"
        rollbacks += res.stats["rollbacks"]
        accepted += res.stats["accepted"]
        exit_stages |= {
            i for i, (a, b) in enumerate(engine.layer_ranges) for l in res.stats["early_by_layer"] if a < l <= b
        }
    assert rollbacks >= 5  # the premise: verification really had to undo work
    assert exit_stages == set(range(stages))  # and early tokens came from every stage
    assert (merged_chunks(engine) > merged) == (mode == "deferred")  # and deferred really merged


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_context_lookup_guesses_match_plain_greedy(engines, cases, stages, mode):
    """The context's guesses (runtime/context_lookup.py) exit at the first head an item reaches:
    with a 1-token match many are wrong, and every one is verified and, where wrong, rolled back.
    The heads (on every stage) are almost never confident themselves, so the guesses carry the
    exits. For deferred, equal tokens are the CPU fp32 property (module docstring), not a rule."""
    engine = engines[stages]
    layers = boundary_layers(engine)
    with_heads(engine, untrained_heads(engine, layers, threshold=0.99))
    emitted = {0: 0, 1: 0}
    rollbacks = 0
    default = engine.lookup
    try:
        for lookup in (0, 1):
            engine.lookup = lookup
            counts = decode_cases(engine, cases, mode, f"{stages} stages, {mode}, lookup {lookup}")
            emitted[lookup] += counts.early_emitted
            rollbacks += counts.rollbacks if lookup else 0
    finally:
        engine.lookup = default
    assert emitted[1] > emitted[0] + 10  # the premise: the guesses went out
    assert rollbacks >= 3  # and some were wrong


class DraftingCoordinator(coordinator_module.Coordinator):
    """The real Coordinator, also keeping every draft it sends: (position, token)."""

    drafts: list = []

    def next_action(self):
        action = super().next_action()
        if getattr(action, "drafts", 0):
            first = action.pos + len(action.tokens) - action.drafts
            DraftingCoordinator.drafts.extend(enumerate(action.tokens[-action.drafts:], first))
        return action


def decode_cases(engine: Engine, cases, mode: str, what: str) -> GenerationStats:
    """Each case decoded in ``mode`` to MAX_NEW_TOKENS and to 3 (a length stop with early tokens in
    flight), token for token against its reference; their counters added up."""
    total = GenerationStats()
    for ids, ref in cases:
        for n in (MAX_NEW_TOKENS, 3):
            res = engine.generate(ids, max_new_tokens=n, early_exit=mode)
            at = first_divergence(res.tokens, ref[:n])
            assert at is None, f"{what}: diverges at {at}"
            total += res.counters
    return total


def drafting(engine: Engine, lookup: int = 1, draft: int = 3, table=None):
    """``engine`` with the lookup's drafts, and ``table``'s where the sequence has no match
    (restored by the caller: ``engine.lookup, engine.draft, engine.table``)."""
    saved = engine.lookup, engine.draft, engine.table
    engine.lookup, engine.draft, engine.table = lookup, draft, table
    return saved


def bundled_table(engine: Engine):
    return load_draft_table(bundled_table_path(), fingerprint=engine.resolved.fingerprint,
                            vocab_size=engine.args.vocab_size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_lookup_drafts_match_plain_greedy(engines, cases, stages, mode):
    """Decode requests carry the lookup's drafts (coordinator.py), verified by the final layer in
    the same pass. With 1-token matches many are wrong and roll back; with heads at every
    boundary the guess after the drafts exits there too; without heads the drafts run alone, and
    the bundled draft table drafts where the sequence has no match.
    For deferred, equal tokens are the CPU fp32 property (module docstring), not a rule."""
    engine = engines[stages]
    saved = drafting(engine)
    total = GenerationStats()
    try:
        for heads, table in ((untrained_heads(engine, boundary_layers(engine), threshold=0.99), None),
                             (None, bundled_table(engine))):
            with_heads(engine, heads)
            engine.table = table
            total += decode_cases(engine, cases, mode, f"{stages} stages, {mode}, heads {heads is not None}")
    finally:
        engine.lookup, engine.draft, engine.table = saved
    assert total.lookup_accepted > 10 and total.rollbacks >= 3  # the premise: drafts went out, right and wrong
    assert 0 < total.table_accepted < total.table_drafted  # and the table's, right and wrong


@pytest.mark.parametrize("stages", [1, 3])
def test_eos_drafted_stops_only_once_verified(engines, monkeypatch, stages):
    """Declare a drafted token the EOS: where the draft was right, generation ends exactly there,
    once verified; where it was wrong, it is rolled back and never ends the sequence."""
    engine = with_heads(engines[stages], None)
    monkeypatch.setattr("adadecode.runtime.engine.Coordinator", DraftingCoordinator)
    eos, saved = engine.eos_token_ids, drafting(engine)
    right = wrong = 0
    n = 48  # long enough for a draft from the prompt to be a token's first occurrence in the output
    try:
        for prompt in select_prompts("data/prompts/mix.jsonl", 3):
            ids = engine.encode(prompt, chat=isinstance(prompt, list))
            ref = engine.generate(ids, max_new_tokens=n).tokens  # plain decoding: equal to generate's, tested
            DraftingCoordinator.drafts = []
            engine.generate(ids, max_new_tokens=n, early_exit="eager")
            for pos, token in DraftingCoordinator.drafts:
                j = pos - len(ids)  # the draft at position ``pos`` stands for output token j
                if not 0 <= j < len(ref) or token in ref[:j] or (right if token == ref[j] else wrong) >= 2:
                    continue  # the first occurrence only, so that the draft is the trigger
                if token != ref[j] and token in ref:
                    continue
                engine.eos_token_ids = frozenset({token})
                res = engine.generate(ids, max_new_tokens=n, early_exit="eager")
                engine.eos_token_ids = eos
                assert res.tokens == (ref[: j + 1] if token == ref[j] else ref), (stages, pos, token)
                assert res.finish_reason == ("eos" if token == ref[j] else "length")
                right, wrong = right + (token == ref[j]), wrong + (token != ref[j])
    finally:
        engine.eos_token_ids = eos
        engine.lookup, engine.draft, engine.table = saved
    assert right >= 1 and wrong >= 1, f"found {right} right and {wrong} wrong drafted EOS cases"


@pytest.mark.parametrize("mode", MODES)
def test_eager_and_deferred_match_off_with_a_confident_threshold(engines, cases, mode):
    """For deferred, the equality is the CPU fp32 property (module docstring), not a rule."""
    engine = with_heads(engines[1], untrained_heads(engines[1], [20, 26], threshold=0.6))
    merged = merged_chunks(engine)
    for ids, ref in cases:
        res = engine.generate(ids, max_new_tokens=MAX_NEW_TOKENS, early_exit=mode)
        assert res.tokens == ref
        assert res.stats["early_emitted"] > 0
    assert (merged_chunks(engine) > merged) == (mode == "deferred")


class RecordingCoordinator(coordinator_module.Coordinator):
    """The real Coordinator, also keeping every early prediction it is shown."""

    seen: list = []

    def receive(self, event):
        if type(event).__name__ == "EarlyPrediction":
            RecordingCoordinator.seen.append(event)
        super().receive(event)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_eos_emitted_early_on_each_stage_stops_only_once_verified(engines, cases, monkeypatch, stage):
    """Heads on one stage of three. Declare a token the EOS that a head there predicted early:
    wrongly (it must be rolled back, never end the sequence) and, where the head was right,
    correctly (generation ends exactly there, once verified). For deferred with heads on stage
    0, equal tokens are the CPU fp32 property (module docstring), not a rule."""
    engine = engines[3]
    a, b = engine.layer_ranges[stage]
    layers = sorted({(a + b) // 2, b} - {30})
    with_heads(engine, untrained_heads(engine, layers))
    monkeypatch.setattr("adadecode.runtime.engine.Coordinator", RecordingCoordinator)
    eos = engine.eos_token_ids
    merged = 0
    try:
        right = wrong = 0
        for ids, ref in cases:
            RecordingCoordinator.seen = []
            engine.generate(ids, max_new_tokens=MAX_NEW_TOKENS, early_exit="eager")
            for ev in RecordingCoordinator.seen:
                j = ev.pos - len(ids)
                if not 0 <= j < len(ref) or ev.token in ref[:j]:
                    continue  # stop at the first occurrence only, so the early token is the trigger
                expected = ref[: j + 1] if ev.token == ref[j] else (ref if ev.token not in ref else None)
                if expected is None or (right if ev.token == ref[j] else wrong) >= 1:
                    continue
                engine.eos_token_ids = frozenset({ev.token})
                for mode in MODES:
                    before = merged_chunks(engine)
                    res = engine.generate(ids, max_new_tokens=MAX_NEW_TOKENS, early_exit=mode)
                    if mode == "deferred":
                        merged += merged_chunks(engine) - before
                    assert res.tokens == expected, (stage, mode, ev)
                    assert res.finish_reason == ("eos" if ev.token == ref[j] else "length")
                engine.eos_token_ids = eos
                right, wrong = right + (ev.token == ref[j]), wrong + (ev.token != ref[j])
        assert wrong == 1 and right == 1, f"stage {stage}: found {right} right and {wrong} wrong early EOS cases"
        if stage == 0:
            assert merged > 0
        # With heads on a later stage only, the LocalRunner runs that stage's parked backfill idle
        # (the next token reaches it a tick later), so nothing merges and those deferred runs
        # compute the chunks eager does: their equality is the eager rule, not the fp32 property.
    finally:
        engine.eos_token_ids = eos


@pytest.mark.parametrize("n", [1, 2, 5])
def test_max_new_tokens_with_early_tokens_in_flight(engines, cases, n):
    """For deferred, equal tokens are the CPU fp32 property (module docstring), not a rule."""
    engine = with_heads(engines[2], untrained_heads(engines[2], [10, 19, 25], threshold=0.2))
    ids, ref = cases[0]
    for mode in MODES:
        merged = merged_chunks(engine)
        res = engine.generate(ids, max_new_tokens=n, early_exit=mode)
        assert res.tokens == ref[:n] and res.finish_reason in ("length", "eos")
        assert (merged_chunks(engine) > merged) == (mode == "deferred")


def test_stop_string_with_early_exit(engines):
    """For deferred, equal tokens are the CPU fp32 property (module docstring), not a rule."""
    engine = with_heads(engines[1], untrained_heads(engines[1], [16, 24], threshold=0.3))
    plain = engine.generate("List three colours:\n1.", max_new_tokens=30, stop=["2."])
    for mode in MODES:
        merged = merged_chunks(engine)
        res = engine.generate("List three colours:\n1.", max_new_tokens=30, stop=["2."], early_exit=mode)
        assert (res.tokens, res.text, res.finish_reason) == (plain.tokens, plain.text, "stop")
        assert (merged_chunks(engine) > merged) == (mode == "deferred")


def test_early_exit_without_heads_is_refused(engines):
    """Without heads and without drafts (none here: eager CPU stages, ``LoadSpec.drafts``). Where
    drafts are all there is, a sampled request, which gets none, runs as off."""
    engine = with_heads(engines[1], None)
    assert engine.draft == 0
    with pytest.raises(ValueError, match="needs exit heads"):
        engine.generate("Hi", max_new_tokens=2, early_exit="eager")
    saved = drafting(engine)
    try:
        res = engine.generate("1, 2, 3, 1, 2, 3, 1, 2, 3, 1,", max_new_tokens=8, early_exit="eager")
        assert res.stats["draft_rate"] > 0 and res.stats["early_exit"] == "eager"
        sampled = engine.generate("Hi", max_new_tokens=2, early_exit="eager", temperature=0.7, seed=1)
        assert sampled.stats["early_exit"] == "off"
    finally:
        engine.lookup, engine.draft, engine.table = saved
