"""Every supported family on a device: tiny random models (tests/helpers.py), greedy tokens of 1, 2
and 3 in-process stages, early exit off and eager (random heads: early tokens flow, most are
rolled back), against transformers' `generate` on the same device and dtype.

tests/test_parity.py checks the same on the CPU in float32; this script is the GPU's check
(scripts/gpu_check.sh runs it), where nothing of it runs in CI:

    python scripts/family_parity.py --device cuda:0 --dtype bfloat16 --json-out families.json
    python scripts/family_parity.py --device cuda:0 --compile   # the compiled step: its match rate

Exit status 1 if an eager run differs from transformers (compiled runs report their match rate:
fused kernels round differently, docs/design.md, invariant 4).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from adadecode.runtime.coordinator import Coordinator
from adadecode.runtime.exit_heads import ExitHeads
from adadecode.runtime.hf_adapter import ModelArgs, load_hf_config, load_stage_modules
from adadecode.runtime.model_runner import StageModel
from adadecode.runtime.model_source import SUPPORTED_MODEL_TYPES
from adadecode.runtime.runners.inprocess import LocalRunner
from adadecode.runtime.stage import Stage
from adadecode.runtime.stopping import StopCriteria
from helpers import save_tiny_model

SPLITS = ([(0, 6)], [(0, 3), (3, 6)], [(0, 1), (1, 4), (4, 6)])
PROMPT = [5, 17, 33, 2, 9, 41, 7]  # longer than the tiny Gemma 3's window of 4


def hf_tokens(path: Path, device: str, dtype: torch.dtype, n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    ids = torch.tensor([PROMPT], device=device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(PROMPT) :].tolist()


def stages(path: Path, ranges, device: str, dtype: torch.dtype, heads: bool, compiled: bool) -> list[Stage]:
    config = load_hf_config(path)
    args = ModelArgs.from_hf_config(config)
    mods = [
        load_stage_modules(path, config, a, b, embed=i == 0, head=i == len(ranges) - 1, dtype=dtype, device=device)
        for i, (a, b) in enumerate(ranges)
    ]
    exit_heads = None
    if heads:  # T = I + 0.5 N(0, 1) at every inner layer: confident often, mostly wrong
        last, layers = mods[-1], [1, 2, 3, 4, 5]
        g = torch.Generator().manual_seed(0)
        d = args.hidden_size
        t = {l: (torch.eye(d) + 0.5 * torch.randn(d, d, generator=g)).to(device, dtype) for l in layers}
        exit_heads = ExitHeads(
            t, last.norm, last.lm_head.weight, None, dict.fromkeys(layers, 0.05), {}, logit_softcap=last.softcap
        )
    models = [StageModel(m, args, 64) for m in mods]
    if compiled:
        from adadecode.runtime.compiled_step import maybe_compile

        for model in models:
            maybe_compile(model, "on", [1, 2, 3, 4, 5], max_chunk=3)  # segments cut at every head layer
    return [Stage(i, len(ranges), model, heads=exit_heads) for i, model in enumerate(models)]


def ours(
    path: Path, ranges, device: str, dtype: torch.dtype, mode: str, n: int, compiled: bool
) -> tuple[list[int], int]:
    runner = LocalRunner(stages(path, ranges, device, dtype, heads=mode != "off", compiled=compiled))
    coord = Coordinator(max_inflight=0 if mode == "off" else 2)
    coord.add_sequence(0, PROMPT, StopCriteria(n, frozenset()), early_exit=mode)
    runner.run(coord)
    s = coord.sequences[0]
    return s.generated, s.stats.early_emitted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--families", default=",".join(SUPPORTED_MODEL_TYPES))
    p.add_argument("--compile", action="store_true", help="through the compiled step (CUDA graphs on a GPU)")
    p.add_argument("--modes", default="off,eager", help="early-exit modes, e.g. off,eager,deferred")
    p.add_argument("--json-out", default="")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for family in a.families.split(","):
            path = save_tiny_model(Path(tmp) / family, family, seed=3)
            ref = hf_tokens(path, a.device, dtype, a.tokens)
            for ranges in SPLITS:
                for mode in a.modes.split(","):
                    tokens, early = ours(path, ranges, a.device, dtype, mode, a.tokens, a.compile)
                    same = tokens == ref
                    match = sum(x == y for x, y in zip(tokens, ref)) / len(ref)
                    failed += not same
                    rows.append(
                        {
                            "family": family,
                            "stages": len(ranges),
                            "mode": mode,
                            "same": same,
                            "match": match,
                            "early_emitted": early,
                            "device": a.device,
                            "dtype": a.dtype,
                            "compiled": a.compile,
                        }
                    )
                    print(
                        f"{family:12} {len(ranges)} stage(s) {mode:6} {'same' if same else 'DIFFERS'} "
                        f"as generate ({match:.0%} of tokens; {early} early)",
                        flush=True,
                    )
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows, indent=1) + "\n")
    how = f"on {a.device} in {a.dtype}" + (", compiled" if a.compile else "")
    print(f"family_parity: {len(rows) - failed}/{len(rows)} runs gave transformers' tokens {how}")
    return 1 if failed and not a.compile else 0


if __name__ == "__main__":
    sys.exit(main())
