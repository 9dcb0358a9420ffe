"""Where a stage computes and in which dtype: ``model.device`` / ``model.dtype`` resolved per rank.

- ``resolve_device("auto", local_rank)`` is ``cuda:LOCAL_RANK`` when CUDA is
  available (modulo the visible GPUs with gloo, which may share one), else the
  CPU; ``cpu``, ``cuda`` (= ``cuda:LOCAL_RANK``) and ``cuda:N`` are taken as given.
- ``resolve_dtype("auto", device)`` is bfloat16 on CUDA, float32 on the CPU.
- ``check_placement`` refuses, before any weight is read, the combinations
  that cannot work: NCCL without CUDA or with CPU stages, two ranks of one job
  on one GPU with NCCL (NCCL refuses it), a GPU index that does not exist,
  float16 on a CPU that cannot compute it.

Every error names the setting, the value and the fix.
"""

from __future__ import annotations

import functools

import torch

from .params import DEVICE_PATTERN

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PlacementError(ValueError):
    """A device / dtype / backend combination that cannot run; the message says how to fix it."""


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: str = "auto", local_rank: int = 0, backend: str = "inprocess") -> torch.device:
    """The torch device of this rank's stage (see the module docstring)."""
    if not DEVICE_PATTERN.match(device):
        raise PlacementError(f"model.device `{device}` is not a device; use auto, cpu, cuda or cuda:N")
    count = _cuda_count()
    if device == "cpu" or (device == "auto" and count == 0):
        return torch.device("cpu")
    if count == 0:
        raise PlacementError(
            f"model.device `{device}` needs a CUDA GPU, but torch {torch.__version__} sees none "
            f"(torch.cuda.is_available() is False); use --model.device=cpu (or auto)"
        )
    if device.startswith("cuda:"):
        index = int(device.split(":")[1])
        if index >= count:
            raise PlacementError(
                f"model.device `{device}` does not exist: {count} GPU(s) are visible "
                f"(cuda:0..cuda:{count - 1}); pick one of those or use auto"
            )
        return torch.device("cuda", index)
    if backend == "nccl" or local_rank < count:
        return torch.device("cuda", local_rank)  # checked against the GPU count in check_placement
    return torch.device("cuda", local_rank % count)  # gloo / in-process ranks may share a GPU


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on the CPU; else the named dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise PlacementError(f"model.dtype `{dtype}` is not supported; use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@functools.cache
def cpu_supports(dtype: torch.dtype) -> bool:
    """Whether this CPU build of torch computes a matmul and a softmax in ``dtype``."""
    try:
        x = torch.ones(4, 4, dtype=dtype)
        torch.softmax(x @ x, dim=-1)
        return True
    except RuntimeError:
        return False


def check_placement(
    device: str, dtype: str, backend: str, *, local_rank: int = 0, local_world_size: int = 1
) -> tuple[torch.device, torch.dtype]:
    """Resolve and check one rank's placement before anything loads; returns (device, dtype).

    ``backend``: inprocess, gloo or nccl; ``local_world_size``: ranks of the job on this node.
    """
    if backend == "nccl":
        if _cuda_count() == 0:
            raise PlacementError(
                "transport.backend `nccl` needs CUDA GPUs, but torch "
                f"{torch.__version__} sees none (torch.cuda.is_available() is False); "
                "use --transport.backend=gloo for CPU ranks"
            )
        if device == "cpu":
            raise PlacementError(
                "transport.backend `nccl` sends GPU tensors, but model.device is `cpu`; "
                "use --model.device=auto (one GPU per rank) or --transport.backend=gloo"
            )
        count = _cuda_count()
        shared = device.startswith("cuda:") and local_world_size > 1
        if shared or local_world_size > count:
            where = f"every rank on `{device}`" if shared else f"{local_world_size} ranks on {count} GPU(s)"
            raise PlacementError(
                f"transport.backend `nccl` with {where} on this node: NCCL refuses two ranks of one job "
                "on one GPU. Give each rank its own GPU (model.device=auto maps rank i to cuda:i), "
                "or use --transport.backend=gloo, which lets ranks share a GPU and stages hidden "
                "states through pinned host memory"
            )
    dev = resolve_device(device, local_rank, backend)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cpu" and not cpu_supports(dt):
        raise PlacementError(
            f"model.dtype `{dtype_name(dt)}` is not supported on this CPU by torch {torch.__version__}; "
            "use --model.dtype=bfloat16 or float32"
        )
    return dev, dt
