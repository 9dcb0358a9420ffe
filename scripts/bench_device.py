"""Plain greedy decoding per dtype, compiled and not, against transformers `generate` and the
memory bandwidth, on one device.

For each dtype (--dtypes), in one process with the same threads and the same prompts,
interleaved prompt by prompt: transformers `generate(do_sample=False)` with the weights in that
dtype, then this runtime with early exit off for each `--compile` setting. Reports tokens/s
(generated tokens over the wall time of the call, prefill included), the ratio to `generate`,
token parity with `generate` (every prompt for the eager path; the compiled path's fused kernels
round differently, so its match rate), the compile time, and the fraction of the bandwidth
limit: a decode step reads every weight once (the LM head included, the embedding only a row)
plus the KV cache, so the limit is the bandwidth of a matrix-vector stream measured in the same
run (scripts/membw.py) divided by the bytes read per token.

    taskset -c 0 python scripts/bench_device.py --num-prompts 8 --max-new-tokens 128 --threads 1
    taskset -c 0 python scripts/bench_device.py --dtypes float32 --compile on,on-aten --max-new-tokens 64

``on-aten`` (CPU): compiled with autotuning free to pick ATen's GEMMs besides the C++ template, as
the compiled step did before row invariance (runtime/compiled_step.py, CPU_INDUCTOR): what
keeping a row's bits at every row count costs a single row. Its merged chunks are checked against
the one-row graph as always, so expect its warm-up to warn that some differ (ATen's GEMMs are not
row-invariant); they then run row by row.
    python scripts/bench_device.py --device cuda --dtypes bfloat16 --compile off,on     # a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adadecode.launcher.bench import first_divergence, hf_generate
from adadecode.runtime import compiled_step
from adadecode.runtime.engine import Engine
from adadecode.runtime.prompts import select_prompts
from membw import stream_bandwidth


def bytes_per_token(engine: Engine, context: float) -> float:
    """Weight bytes a decode step reads (embedding rows excepted) plus the KV cache at ``context``."""
    read = {}
    for stage in engine.stages:
        m = stage.model.modules
        for module in (m.layers, m.norm, m.lm_head):
            if module is not None:
                read.update({p.data_ptr(): p.numel() * p.element_size() for p in module.parameters()})
    a = engine.args
    kv = 2 * a.num_kv_heads * a.head_dim * a.num_layers * torch.finfo(engine.stages[0].model.dtype).bits // 8
    return sum(read.values()) + kv * context


def compile_seconds(engine: Engine) -> float:
    return sum(s.model.step.compile_s for s in engine.stages if s.model.step is not None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bundled:smollm2-135m-instruct")
    ap.add_argument("--prompts", default="data/prompts/heldout.jsonl")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--compile", default="off,on", help="compile settings to time: off, on, on-aten (see above)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chat", action="store_true", help="chat template for plain prompts too")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    bandwidth = stream_bandwidth() if args.device == "cpu" else float("nan")
    prompts = select_prompts(args.prompts, args.num_prompts)
    rows = []
    for dtype in args.dtypes.split(","):
        engines = {}
        for c in args.compile.split(","):
            gemms = "CPP,ATEN" if c == "on-aten" else compiled_step.CPU_INDUCTOR["max_autotune_gemm_backends"]
            with patch.dict(compiled_step.CPU_INDUCTOR, max_autotune_gemm_backends=gemms):  # read at load
                engines[c] = Engine.load(args.model, device=args.device, dtype=dtype, heads=None,
                                         compile="on" if c == "on-aten" else c)
        first = next(iter(engines.values()))
        hf = AutoModelForCausalLM.from_pretrained(str(first.resolved.path), dtype=getattr(torch, dtype))
        hf = hf.to(first.stages[0].model.device).eval()
        eos = sorted(first.eos_token_ids)
        encoded = [first.encode(p, args.chat or isinstance(p, list)) for p in prompts]
        warm = {}
        for name, engine in engines.items():  # compiling happens here, in the first calls
            t0 = time.perf_counter()
            engine.generate(encoded[0], max_new_tokens=8)
            warm[name] = (time.perf_counter() - t0, compile_seconds(engine))
        hf_generate(hf, encoded[0], 8, eos)
        tally = {name: {"tokens": 0, "seconds": 0.0, "identical": 0, "matched": 0} for name in ["hf", *engines]}
        context = 0.0
        for ids in encoded:
            ref, secs = hf_generate(hf, ids, args.max_new_tokens, eos)
            t = tally["hf"]
            t["tokens"], t["seconds"], t["identical"], t["matched"] = (
                t["tokens"] + len(ref), t["seconds"] + secs, t["identical"] + 1, t["matched"] + len(ref))
            context += (len(ids) + len(ref) / 2) * len(ref)
            for name, engine in engines.items():
                res = engine.generate(ids, max_new_tokens=args.max_new_tokens)
                t = tally[name]
                at = first_divergence(res.tokens, ref)
                t["tokens"] += len(res.tokens)
                t["seconds"] += res.stats["elapsed_s"]
                t["identical"] += at is None
                t["matched"] += len(ref) if at is None else at  # tokens before the first divergence
        context /= max(1, tally["hf"]["tokens"])
        per_token = bytes_per_token(first, context)
        base = tally["hf"]["tokens"] / tally["hf"]["seconds"]
        for name, t in tally.items():
            tps = t["tokens"] / t["seconds"]
            row = {
                "dtype": dtype,
                "contender": "transformers generate" if name == "hf" else f"adadecode, compile {name}",
                "tokens_per_s": round(tps, 2),
                "vs_generate": round(tps / base, 3),
                "identical_prompts": f"{t['identical']}/{len(encoded)}",
                "tokens_before_first_divergence": f"{t['matched']}/{tally['hf']['tokens']}",
                "bandwidth_fraction": round(tps * per_token / (bandwidth * 1e9), 3),
            }
            if name in warm:
                row["first_call_s"], row["compile_s"] = round(warm[name][0], 1), round(warm[name][1], 1)
            rows.append(row)
        del engines, hf
    summary = {
        "model": args.model, "device": args.device, "threads": torch.get_num_threads(),
        "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "stream_bandwidth_GBps": round(bandwidth, 2), "results": rows,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print({k: v for k, v in summary.items() if k != "results"})
        for row in rows:
            print(", ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
