"""Costs for the simulator: the bundled model on this CPU (fitted), any Llama-shaped model on H100 (derived).

Theory of operation. The simulator (runtime/sim/simulator.py) needs ``Costs``.
For the bundled model they are fitted on traces recorded on this project's CPU
machine and shipped as ``runtime/assets/sim/smollm2-135m-cpu.json`` (written
by ``launcher/sim_profiles.build_cpu_profile`` from ``data/traces``; a test
refits them and compares). Another model on a CPU gets those costs scaled by
its weight bytes per layer and per LM head. For a GPU, decoding one token is
memory-bound: a layer's time is its weight bytes over the achievable HBM bandwidth, until a
chunk has so many rows that the FLOPs take longer. Every number assumed, with
its source:

- **H100 SXM5**: 3.35 TB/s HBM3 and 989 TFLOP/s dense bf16 (NVIDIA H100
  datasheet). Achievable: 69% of the bandwidth, the fraction gpt-fast reports for
  a compiled Llama-2-7B bf16 decode step on A100-80GB (1,397 GB/s of 2,039 GB/s)
  — the same recipe as our compiled step; 60% of the FLOPs (assumed).
- **Launch**: 15 µs per compute call (a CUDA-graph replay and its host work;
  assumed from the order PyTorch's CUDA-graphs write-up gives), 20 µs per exit
  head (its two small GEMMs plus the one device-to-host read of its decision).
- **NVLink 4** between stages on a node: 450 GB/s per direction (900 GB/s
  bidirectional, datasheet), 10 µs for a small NCCL send/recv (assumed, the order
  nccl-tests reports within a node). **InfiniBand NDR** between nodes: 50 GB/s
  (400 Gb/s per port), 25 µs per small message (assumed).
- **This runtime's Python**: the runner's work per stage output (in process) and
  the control plane's latency (between ranks) are those fitted on this machine's
  traces (its cores are slow; a modern host is faster, so this is conservative
  for the GPU rows).
- **Models**: Llama-3.1-8B (32 layers, d 4096, MLP 14336, 8 KV heads of 128,
  vocabulary 128,256) and Llama-3.1-70B (80 layers, d 8192, MLP 28672), their
  published configs; bf16 weights.

"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

from ..hf_adapter import ModelArgs, decoder_layer_params
from ..kv_cache import kv_bytes_per_position
from .simulator import Costs


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def layer_params(self) -> int:
        return decoder_layer_params(self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a Hugging Face model config."""
        a = ModelArgs.from_hf_config(config)
        return cls(getattr(config, "name_or_path", "") or a.model_type, a.num_layers, a.hidden_size,
                   config.intermediate_size, a.num_heads, a.num_kv_heads, a.head_dim, a.vocab_size)

    def kv_bytes(self, element: int = 2) -> int:
        """Per layer and position: keys and values."""
        return kv_bytes_per_position(self.kv_heads, self.head_dim, element)


@dataclass(frozen=True)
class Device:
    name: str
    bytes_per_s: float
    bandwidth_efficiency: float
    flops: float
    flops_efficiency: float
    launch_s: float
    head_s: float
    memory_bytes: float


@dataclass(frozen=True)
class Link:
    name: str
    latency_s: float
    bytes_per_s: float


LLAMA_8B = ModelShape("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128, 128256)
LLAMA_70B = ModelShape("Llama-3.1-70B", 80, 8192, 28672, 64, 8, 128, 128256)
H100 = Device("H100 SXM5 bf16", 3.35e12, 0.685, 989e12, 0.6, 15e-6, 20e-6, 80e9)
NVLINK = Link("NVLink 4", 10e-6, 450e9)
INFINIBAND = Link("InfiniBand NDR", 25e-6, 50e9)
GPU_MODELS = {"llama-3.1-8b": LLAMA_8B, "llama-3.1-70b": LLAMA_70B}
LINKS = {"nvlink": NVLINK, "ib": INFINIBAND}
CPU_PROFILE = "smollm2-135m-cpu"
# The same machine with the compiled layer loop (pipeline.compile=on): its layers cost about 2.6x
# less and a merged chunk of 2-3 rows no more than one row, so the hops and rollbacks weigh more.
CPU_COMPILED_PROFILE = "smollm2-135m-cpu-compiled"


RUNNER_FIELDS = ("step_s", "link_s", "control_s", "shared_bus")  # what ranks add to a stage's own costs
SMOLLM2_135M = ModelShape("SmolLM2-135M", 30, 576, 1536, 9, 3, 64, 49152)


@cache
def load_cpu_profile(compiled: bool = False) -> dict:
    """The fitted profile of the bundled model on this project's CPU machine, eager or with the
    compiled layer loop."""
    name = CPU_COMPILED_PROFILE if compiled else CPU_PROFILE
    path = resources.files("adadecode.runtime").joinpath("assets", "sim", f"{name}.json")
    return json.loads(path.read_text())


HEAD_VOCAB = 1024  # the restricted vocabulary of the heads the CPU profiles were fitted with


def head_weights(hidden: int, extra: int = 0) -> int:
    """Weights one head evaluation reads: its d x d map, the ``HEAD_VOCAB`` restricted LM-head rows
    the fitted heads score, and ``extra`` (sim/heads.head_extra_weights: an MLP head's weights, the
    rows of a larger vocabulary)."""
    return hidden * hidden + HEAD_VOCAB * hidden + extra


def cpu_costs(model: ModelShape, stages: int, element_size: int = 4, head_extra: int = 0,
              compiled: bool = False) -> Costs:
    """``model`` on this project's CPU: the fitted costs of the bundled model, eager or
    ``compiled``, scaled by weight bytes (per layer; per LM head; per head evaluation), with the
    runner's per-hop costs when there are ranks."""
    profile = load_cpu_profile(compiled)
    base = Costs.from_dict(profile["costs"])
    layer = model.layer_params * element_size / (SMOLLM2_135M.layer_params * 4)
    lm = model.vocab * model.hidden * element_size / (SMOLLM2_135M.vocab * SMOLLM2_135M.hidden * 4)
    costs = replace(
        base, layer_s=[t * layer for t in base.layer_s], row_s=None if base.row_s is None else base.row_s * layer,
        lm_head_s=base.lm_head_s * lm,
        head_s=base.head_s * head_weights(model.hidden, head_extra) / head_weights(SMOLLM2_135M.hidden),
        hidden_bytes=model.hidden * element_size,
    )
    return costs if stages == 1 else replace(costs, **profile["pipeline"])  # ranks: their per-hop costs


def gpu_costs(model: ModelShape, device: Device, link: Link, runner: Costs, max_rows: int = 8,
              head_extra: int = 0) -> Costs:
    """``model`` in bf16 on ``device``, stages joined by ``link``; the runner's own costs from ``runner``."""
    weight_bytes = 2 * model.layer_params
    bw = device.bytes_per_s * device.bandwidth_efficiency

    def layer(rows: int) -> float:
        return max(weight_bytes / bw, 2 * model.layer_params * rows / (device.flops * device.flops_efficiency))

    lm_bytes = 2 * model.vocab * model.hidden
    return Costs(
        layer_s=[layer(n) for n in range(1, max_rows + 1)],
        call_s=device.launch_s,
        kv_s=model.kv_bytes() / bw,
        head_s=device.head_s + 2 * head_weights(model.hidden, head_extra) / bw,
        lm_head_s=device.launch_s + lm_bytes / bw,
        step_s=runner.step_s,
        link_s=link.latency_s,
        link_bytes_per_s=link.bytes_per_s,
        control_s=runner.control_s,
        hidden_bytes=2 * model.hidden,
        shared_bus=0.0,  # a GPU per stage
    )


def runner_costs() -> Costs:
    """This runtime's own costs as measured here, for hardware we only project: the runner's
    work per output in one process, the control plane's latency between ranks."""
    profile = load_cpu_profile()
    return replace(Costs.from_dict(profile["costs"]), control_s=profile["pipeline"]["control_s"])


def setting_costs(model: ModelShape, device_type: str, stages: int, element_size: int = 4,
                  link: Link = NVLINK, head_extra: int = 0, compiled: bool = False) -> Costs:
    """The costs of ``model`` on ``stages`` ranks of ``device_type`` (``cpu``: this project's CPU,
    eager or with the ``compiled`` layer loop; ``cuda``: H100s joined by ``link``, whatever the
    GPU, always the compiled recipe: a projection, not a measurement). ``head_extra``: weights an
    exit head reads beyond a linear one's (an MLP head's)."""
    if device_type == "cuda":
        return gpu_costs(model, H100, link, runner_costs(), head_extra=head_extra)
    return cpu_costs(model, stages, element_size, head_extra, compiled)
