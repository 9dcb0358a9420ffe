"""What a merged chunk costs: one stage's layers and LM head on 1, 2 and 3 rows, eager and compiled.

A `deferred` backfill runs an early token's remaining layers merged with the next token's
pass, as one chunk of 2 (or, with more tokens in flight, 3) rows. It pays only where a
chunk of k rows costs well under k single rows. This times exactly the calls a stage makes
(`StageModel.run_layers` over every layer on k decode rows, `parts` 1 each, then
`greedy_tokens`) at a fixed context length, the cache truncated back after each call as a
rollback would, with the compiled step (`pipeline.compile=on`, runtime/compiled_step.py) and
without, under `pipeline.row_invariant` (`--row-invariant`; off: the rows share every call).

    taskset -c 0 python scripts/chunk_cost.py --threads 1 --context 128 --repeats 30
    taskset -c 0 python scripts/chunk_cost.py --compile on --gemm-backends CPP,ATEN   # autotune's pick

On a GPU, the layers of a model the simulator projects (runtime/sim/costs.py: its shape, random
bf16 weights, ``--random-layers`` of them; the per-layer cost is what the projection needs):

    python scripts/chunk_cost.py --device cuda:0 --dtype bfloat16 --random-shape llama-3.1-8b --rows 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from adadecode.runtime.compiled_step import CPU_INDUCTOR
from adadecode.runtime.engine import Engine
from adadecode.runtime.sim.costs import GPU_MODELS


def time_calls(fn, repeats: int, device: str) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls, after 3 warm-up calls (on a GPU,
    each call waited for)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(samples)


def random_model(shape_name: str, layers: int, device: str, out: Path) -> str:
    """A Llama-architecture directory of ``shape_name``'s shape (runtime/sim/costs.py), ``layers``
    decoder layers of random bf16 weights: the cost of a layer does not depend on its values. Its
    tokenizer is a one-word placeholder: the timed calls take token ids."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    s = GPU_MODELS[shape_name]
    config = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                         vocab_size=s.vocab, max_position_embeddings=8192, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out))
    placeholder = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=placeholder, unk_token="<unk>").save_pretrained(str(out))
    return str(out)


def measure(source: str, compile_setting: str, rows: list[int], context: int, repeats: int, dtype: str,
            row_invariant: str = "auto", device: str = "cpu") -> dict:
    """``{"layers": the stage's layer count, "rows": {k: {"layers_ms", "head_ms"}}}``."""
    engine = Engine.load(source, stages=1, device=device, dtype=dtype, heads=None, compile=compile_setting,
                         max_inflight=max(rows) - 1, max_seq_len=context + max(rows) + 8, row_invariant=row_invariant)
    model = engine.stages[0].model
    prompt = torch.randint(0, engine.args.vocab_size, (context,)).tolist()
    model.run_layers(model.embed(prompt), 0, model.start, model.end)
    out = {}
    for k in rows:
        hidden = model.embed(prompt[:k])

        def layers(hidden=hidden, parts=(1,) * k):
            model.run_layers(hidden, context, model.start, model.end, parts=parts)
            model.truncate(0, context)

        out[k] = {"layers_ms": time_calls(layers, repeats, device),
                  "head_ms": time_calls(lambda hidden=hidden: model.greedy_tokens(hidden), repeats, device)}
    return {"layers": model.end - model.start, "rows": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="bundled:smollm2-135m-instruct")
    p.add_argument("--random-shape", choices=sorted(GPU_MODELS), help="instead of --model: that shape, random weights")
    p.add_argument("--random-layers", type=int, default=4, help="decoder layers of the --random-shape model")
    p.add_argument("--context", type=int, default=128, help="positions already in the cache")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", nargs="+", default=["off", "on"])
    p.add_argument("--row-invariant", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--gemm-backends", default=CPU_INDUCTOR["max_autotune_gemm_backends"],
                   help="inductor's GEMM backends on compiled stages (CPP,ATEN: let autotuning pick ATen's too)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    CPU_INDUCTOR["max_autotune_gemm_backends"] = a.gemm_backends
    with tempfile.TemporaryDirectory() as tmp:
        source = random_model(a.random_shape, a.random_layers, a.device, Path(tmp)) if a.random_shape else a.model
        results = {c: measure(source, c, a.rows, a.context, a.repeats, a.dtype, a.row_invariant, a.device)
                   for c in a.compile}
    if a.json:
        print(json.dumps(results, indent=1))
        return
    print("| path | rows | layers (ms) | per layer (ms) | LM head (ms) | step (ms) | x one row | per row |")
    print("|---|---|---|---|---|---|---|---|")
    for c, res in results.items():
        by_rows = res["rows"]
        one = by_rows[a.rows[0]]["layers_ms"] + by_rows[a.rows[0]]["head_ms"]
        for k, r in by_rows.items():
            step = r["layers_ms"] + r["head_ms"]
            print(f"| {'compiled' if c == 'on' else 'eager'} | {k} | {r['layers_ms']:.2f} | "
                  f"{r['layers_ms'] / res['layers']:.3f} | {r['head_ms']:.2f} | "
                  f"{step:.2f} | {step / one:.2f} | {step / one / k:.2f} |")


if __name__ == "__main__":
    main()
