"""Head families (runtime/head_training/families.py) and teacher-forced collection
(runtime/head_training/teacher_forced.py) on a tiny random-weight model."""

from __future__ import annotations

import pytest
import torch
from adadecode.runtime.head_training import families
from adadecode.runtime.head_training.teacher_forced import SeqStates, split_prompts, teacher_forced
from helpers import tiny_config


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


def test_linear_and_mlp_start_as_identity(tiny):
    d = tiny.config.hidden_size
    h = torch.randn(5, d)
    for fam in ("linear", "mlp"):
        head = families.make_head(fam, tiny, 2)
        assert torch.allclose(head.transform(h), h, atol=1e-6)
    assert families.make_head("mlp", tiny, 2, hidden=16).num_params() == d * d + d + 2 * 16 * d


def test_adapter_from_layer_is_the_base_layer(tiny):
    """An adapter copied from decoder layer l computes exactly that layer on a whole sequence."""
    ids = torch.randint(0, tiny.config.vocab_size, (1, 9))
    with torch.no_grad():
        hs = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states
        head = families.make_head("adapter", tiny, 2)
        out = head.transform(hs[2], torch.arange(9))
    assert torch.allclose(out, hs[3], atol=1e-5)


def test_adapter_cache_steps_and_truncate_match_the_full_pass(tiny):
    torch.manual_seed(1)
    head = families.make_head("adapter", tiny, 3, hidden=32, from_layer=False)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.2)
        h = torch.randn(12, tiny.config.hidden_size)
        full = head.transform(h[None], torch.arange(12))[0]
        cache = head.new_cache(capacity=4)  # grows
        got = [head.step(h[:5], cache), head.step(h[5:6], cache)]
        wrong = head.step(torch.randn(3, h.shape[1]), cache)  # a speculative chunk, rolled back
        assert cache.length == 9 and not torch.allclose(wrong, full[6:9], atol=1e-3)
        cache.truncate(6)
        got += [head.step(h[6:8], cache), head.step(h[8:12], cache)]
    assert torch.allclose(torch.cat(got), full, atol=1e-5)
    with pytest.raises(ValueError):
        cache.truncate(13)


def test_teacher_forced_states_and_targets(tiny):
    seqs = [[1, 5, 7, 9, 11], [3, 4, 8]]
    st = teacher_forced(tiny, seqs, [2, 4], score_from=[2, 0])
    assert st.offsets.tolist() == [0, 4, 6]  # the last position of each sequence is dropped
    assert st.scored.tolist() == [False, False, True, True, True, True]
    with torch.no_grad():
        out = tiny(input_ids=torch.tensor([seqs[0]]), output_hidden_states=True)
    assert torch.equal(st.targets[:4], out.logits[0, :4].argmax(-1))
    assert torch.allclose(st.hidden[4][:4].float(), out.hidden_states[4][0, :4], atol=1e-2)
    sub = st.subset([1])
    assert sub.tokens.tolist() == [3, 4] and SeqStates.concat([st, sub]).offsets.tolist() == [0, 4, 6, 8]


def test_split_prompts_is_the_pipelines_rule():
    g = split_prompts(list(range(20)), 10)
    assert g["validation"] == [9, 19] and len(g["train"]) == 18


def test_fit_temperature_sharpens_an_underconfident_head():
    torch.manual_seed(0)
    n, k = 4000, 8
    target = torch.randint(0, k, (n,))
    logits = torch.randn(n, k) * 0.3
    logits[torch.arange(n), target] += 1.0  # right ~90% of the time but soft
    agree = logits.argmax(-1) == target
    t = families.fit_temperature(logits, agree)
    conf = torch.softmax(logits / t, -1).max(-1).values
    assert t < 1 and abs(float(conf.mean()) - float(agree.float().mean())) < 0.03
