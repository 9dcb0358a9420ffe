"""Devices without a GPU: every refused device / dtype / backend combination, and the CUDA path
itself run under ``FakeTensorMode``.

Under ``torch._subclasses.fake_tensor.FakeTensorMode`` the CPU-only torch build creates tensors
on ``cuda`` without memory and runs every op on their metadata (tests/fake_cuda.py: plus a shim
for the few Python-level methods that need a real CUDA device guard). A tensor left on the CPU then
raises ``FakeTensorDeviceMismatchError`` when it meets a CUDA tensor, and a host sync (``.item()``,
``.tolist()``, a branch on a tensor's value) raises ``DataDependentOutputException``. So a stage
built and driven under the mode proves that its weights, KV cache, RoPE tables, masks and heads
live on the device (linear and MLP heads alike), and that the only host syncs are the ones routed through
``model_runner.to_host`` (stubbed here and counted): one per head evaluation, one per item
that reaches the final layer.
"""

from __future__ import annotations

import pytest
import safetensors
import torch
from adadecode.runtime import model_runner
from adadecode.runtime.compiled_step import CompiledStep
from adadecode.runtime.device import (
    PlacementError,
    check_placement,
    resolve_device,
    resolve_dtype,
)
from adadecode.runtime.events import (
    WAITING,
    Activations,
    EarlyPrediction,
    FinalPrediction,
    Rollback,
    StepRequest,
)
from adadecode.runtime.exit_heads import ExitHeads
from adadecode.runtime.hf_adapter import ModelArgs, load_hf_config, load_stage_modules
from adadecode.runtime.model_runner import StageModel
from adadecode.runtime.stage import Stage
from fake_cuda import fake_cuda
from helpers import save_tiny_model

# ------------------------------------------------------------ placement: what is refused


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` CUDA GPUs (placement reads only the count)."""

    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


PLACED = [
    # gpus, device, dtype, backend, local_rank, local_world, -> device, dtype
    (0, "auto", "auto", "inprocess", 0, 1, "cpu", torch.float32),
    (0, "cpu", "bfloat16", "gloo", 1, 2, "cpu", torch.bfloat16),
    (2, "auto", "auto", "nccl", 1, 2, "cuda:1", torch.bfloat16),
    (2, "auto", "float32", "inprocess", 0, 1, "cuda:0", torch.float32),
    (1, "auto", "auto", "gloo", 1, 2, "cuda:0", torch.bfloat16),  # gloo ranks may share a GPU
    (2, "cuda", "auto", "gloo", 1, 2, "cuda:1", torch.bfloat16),
    (4, "cuda:3", "float16", "gloo", 0, 1, "cuda:3", torch.float16),
    (2, "cpu", "auto", "gloo", 0, 2, "cpu", torch.float32),
]


@pytest.mark.parametrize("gpu_count,device,dtype,backend,local_rank,local_world,want_device,want_dtype", PLACED)
def test_placement(gpus, gpu_count, device, dtype, backend, local_rank, local_world, want_device, want_dtype):
    gpus(gpu_count)
    got = check_placement(device, dtype, backend, local_rank=local_rank, local_world_size=local_world)
    assert got == (torch.device(want_device), want_dtype)


REFUSED = [
    # gpus, device, dtype, backend, local_rank, local_world, words the error must contain
    (0, "auto", "auto", "nccl", 0, 2, ["`nccl` needs CUDA GPUs", "--transport.backend=gloo"]),
    (2, "cpu", "auto", "nccl", 0, 2, ["model.device is `cpu`", "--model.device=auto"]),
    (1, "auto", "auto", "nccl", 0, 2, ["NCCL refuses two ranks of one job on one GPU", "--transport.backend=gloo"]),
    (2, "cuda:0", "auto", "nccl", 0, 2, ["every rank on `cuda:0`", "NCCL refuses"]),
    (0, "cuda", "auto", "gloo", 0, 1, ["needs a CUDA GPU", "--model.device=cpu"]),
    (2, "cuda:2", "auto", "inprocess", 0, 1, ["`cuda:2` does not exist", "cuda:0..cuda:1"]),
    (0, "gpu", "auto", "inprocess", 0, 1, ["`gpu` is not a device", "auto, cpu, cuda or cuda:N"]),
    (0, "cpu", "fp8", "inprocess", 0, 1, ["`fp8` is not supported", "float32"]),
]


@pytest.mark.parametrize("gpu_count,device,dtype,backend,local_rank,local_world,words", REFUSED)
def test_refused_placements_say_why_and_what_to_do(gpus, gpu_count, device, dtype, backend, local_rank,
                                                   local_world, words):
    gpus(gpu_count)
    with pytest.raises(PlacementError) as e:
        check_placement(device, dtype, backend, local_rank=local_rank, local_world_size=local_world)
    for w in words:
        assert w in str(e.value)


def test_float16_on_a_cpu_that_cannot_compute_it_is_refused(monkeypatch):
    from adadecode.runtime import device as device_module

    monkeypatch.setattr(device_module, "cpu_supports", lambda dtype: dtype != torch.float16)
    with pytest.raises(PlacementError, match="model.dtype `float16` is not supported on this CPU"):
        check_placement("cpu", "float16", "inprocess")
    assert check_placement("cpu", "bfloat16", "inprocess") == (torch.device("cpu"), torch.bfloat16)


def test_auto_resolves_by_local_rank(gpus):
    gpus(4)
    assert resolve_device("auto", local_rank=3, backend="nccl") == torch.device("cuda", 3)
    assert resolve_dtype("auto", torch.device("cuda", 3)) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32


def test_cli_refuses_nccl_here_before_loading_anything(capsys):
    from adadecode.launcher.cli import main

    assert main(["generate", "--stages", "2", "--transport.backend=nccl", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "`nccl` needs CUDA GPUs" in err and "--transport.backend=gloo" in err


# -------------------------------------------------- the CUDA path, under FakeTensorMode


def _fake_cuda_weights(monkeypatch):
    """Make the loader's reads produce (fake) CUDA tensors of each file tensor's shape and dtype:
    the fake mode cannot copy host data to a device, so the weights are created there."""
    real_open = safetensors.safe_open
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

    class DeviceReader:
        def __init__(self, path, framework="pt", device="cpu"):
            self.f = real_open(path, framework=framework)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, name):
            meta = self.f.get_slice(name)
            return torch.empty(meta.get_shape(), dtype=dtypes[meta.get_dtype()], device="cuda:0")

    monkeypatch.setattr(safetensors, "safe_open", DeviceReader)


@pytest.fixture
def host_syncs(monkeypatch):
    """Stub ``to_host`` (a real sync would raise under the fake mode) and count its calls."""
    calls: list[str] = []

    def to_host(t: torch.Tensor):
        assert t.device.type == "cuda"
        if t.dtype == torch.float64:  # an exit head: [confidence, index]
            calls.append("head")
            return [0.99, 7.0]
        calls.append("final")
        return [3] * t.shape[0]  # the final layer's tokens

    monkeypatch.setattr(model_runner, "to_host", to_host)
    return calls


@pytest.mark.parametrize("dtype,head_type", [(torch.bfloat16, "linear"), (torch.float32, "linear"),
                                             (torch.bfloat16, "mlp")])
def test_a_stage_runs_entirely_on_cuda_with_host_syncs_only_at_decisions(tmp_path, monkeypatch, host_syncs, dtype,
                                                                          head_type):
    path = save_tiny_model(tmp_path, "llama")
    config = load_hf_config(path)
    args = ModelArgs.from_hf_config(config)
    _fake_cuda_weights(monkeypatch)
    with fake_cuda():
        modules = load_stage_modules(path, config, 0, 6, embed=True, head=True, dtype=dtype, device="cuda:0")
        model = StageModel(modules, args, max_seq_len=64)
        cuda = torch.device("cuda", 0)
        assert all(p.device == cuda and p.dtype == dtype for p in modules.layers.parameters())
        assert model.cache.k[0].device == cuda and model.cos.device == cuda and modules.embed.weight.device == cuda
        d, on = args.hidden_size, {"dtype": dtype, "device": "cuda:0"}
        head = {"T": torch.eye(d, **on)}
        if head_type == "mlp":  # its own norm (in float32, cast back) and MLP, all on the device
            head |= {"W1": torch.randn(16, d, **on), "W2": torch.randn(d, 16, **on), "g": torch.ones(d, **on)}
        heads = ExitHeads({3: head}, modules.norm, modules.lm_head.weight, None, {3: 0.5},
                          {"default_layers": [3], "default_thresholds": {"3": 0.5}})
        stage = Stage(0, 1, model, heads=heads, policy="eager")

        def drain():
            out = []
            while (ev := stage.next_action()) is not WAITING:
                out.append(ev)
            return out

        stage.receive(StepRequest(0, 0, 0, (5, 17, 33, 2)))  # prefill: the head exits, then backfill
        out = drain()
        assert [type(e) for e in out] == [EarlyPrediction, FinalPrediction]
        assert host_syncs == ["head", "final"]
        stage.receive(StepRequest(0, 0, 4, (7,)))  # the early token, a chunk of one
        stage.receive(StepRequest(0, 0, 5, (3,)))
        drain()
        assert model.cache_length(5, 0) == 6
        stage.receive(Rollback(0, 1, 5))  # a length move on the device cache
        assert model.cache_length(0, 0) == 5
        stage.policy = "deferred"  # the parked backfill merges with the next token: a 2-row chunk
        stage.receive(StepRequest(0, 1, 5, (9,)))
        stage.receive(StepRequest(0, 1, 6, (7,)))
        drain()
        assert stage.stats.merged == 1 and model.cache_length(5, 0) == 7
        assert host_syncs.count("head") == stage.stats.head_evals
        assert host_syncs.count("final") == 4  # one per item that left the final layer

        # the compiled step's static-shape layer loop (what CUDA graphs capture), uncompiled
        step = CompiledStep(model, boundaries=[3], max_chunk=3, backend="eager")
        assert step.static_kv and step.segments == [(0, 3), (3, 6)]
        hidden = model.embed([11, 12])
        for seg in step.segments:
            hidden = step._segment(*seg)(hidden, step.positions[7:9], step.positions, 0)
        assert hidden.shape == (2, args.hidden_size) and hidden.device == cuda


def test_a_tensor_left_on_the_cpu_is_caught(tmp_path, monkeypatch):
    """The premise of the test above: the fake mode does catch a CPU tensor in the CUDA path."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    with fake_cuda():
        a = torch.ones(3, device="cuda:0")
        with pytest.raises(FakeTensorDeviceMismatchError):
            a + torch.ones(3)


def test_a_host_sync_is_caught():
    from torch._subclasses.fake_tensor import DataDependentOutputException

    with fake_cuda(), pytest.raises(DataDependentOutputException):
        torch.ones(3, device="cuda:0").sum().item()


def test_activations_cross_to_the_next_stage_on_the_device(tmp_path, monkeypatch, host_syncs):
    path = save_tiny_model(tmp_path, "qwen3")
    config = load_hf_config(path)
    args = ModelArgs.from_hf_config(config)
    _fake_cuda_weights(monkeypatch)
    with fake_cuda():
        first = Stage(0, 2, StageModel(load_stage_modules(path, config, 0, 3, embed=True, head=False,
                                                          dtype=torch.bfloat16, device="cuda:0"), args, 32))
        second = Stage(1, 2, StageModel(load_stage_modules(path, config, 3, 6, embed=False, head=True,
                                                           dtype=torch.bfloat16, device="cuda:0"), args, 32))
        first.receive(StepRequest(0, 0, 0, (1, 2, 3)))
        act = first.next_action()
        assert isinstance(act, Activations) and act.hidden.device.type == "cuda"
        second.receive(act)
        assert isinstance(second.next_action(), FinalPrediction)
    assert host_syncs == ["final"]
