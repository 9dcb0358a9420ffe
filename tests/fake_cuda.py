"""Run CUDA code paths on a CPU-only torch build: ``FakeTensorMode`` plus an indexing shim.

Under ``FakeTensorMode`` this build creates ``cuda`` tensors without memory and runs aten ops on
their metadata, but a few Python-level ``Tensor`` methods first take a CUDA device guard, which a
build without CUDA cannot give ("PyTorch is not linked with support for cuda devices"): indexing
(``t[...]``, ``t[...] = v``), ``copy_`` and ``contiguous``; and it moves one-element tensors
made from Python data with the real op. ``fake_cuda()`` routes exactly those
through the same aten ops without the guard (``aten.slice`` / ``select`` / ``unsqueeze`` /
``index`` / ``index_put_`` / ``copy_`` / ``clone``), so the semantics are the ordinary ones.
Everything else runs as is: a CPU tensor meeting a CUDA one still raises
``FakeTensorDeviceMismatchError``, and a host sync still raises ``DataDependentOutputException``.
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


def _index(t: torch.Tensor, idx) -> tuple[torch.Tensor, list]:
    """``t[idx]`` for basic indices; returns the view and the advanced (tensor) indices per dim."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, dim, advanced = t, 0, []
    for i in idx:
        if i is Ellipsis:
            advanced += [None] * (t.dim() - real)
            dim += t.dim() - real
        elif i is None:
            out = aten.unsqueeze.default(out, dim)
            advanced.append(None)
            dim += 1
        elif isinstance(i, int):
            out = aten.select.int(out, dim, i)
        elif isinstance(i, slice):
            out = aten.slice.Tensor(out, dim, i.start, i.stop, i.step or 1)
            advanced.append(None)
            dim += 1
        elif isinstance(i, torch.Tensor):
            advanced.append(i)
            dim += 1
        else:
            raise TypeError(f"fake_cuda: index {i!r} is not supported")
    while advanced and advanced[-1] is None:
        advanced.pop()
    return out, advanced


def _getitem(t, idx):
    view, advanced = _index(t, idx)
    return aten.index.Tensor(view, advanced) if advanced else view


def _setitem(t, idx, value):
    view, advanced = _index(t, idx)
    if not isinstance(value, torch.Tensor):
        value = torch.full((), value, dtype=t.dtype, device=t.device)
    if advanced:
        aten.index_put_.default(view, advanced, value)
    else:
        aten.copy_.default(view, value)


class _GuardFreeIndexing(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            return _getitem(*args)
        if func is torch.Tensor.__setitem__:
            return _setitem(*args)
        if func is torch.Tensor.copy_:
            return aten.copy_.default(args[0], args[1])
        if func is torch.Tensor.contiguous:
            return aten.clone.default(args[0], memory_format=torch.contiguous_format)
        with torch._C.DisableTorchFunction():  # tensor constructors take another path under a mode
            return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda():
    """``FakeTensorMode`` in which CUDA code paths run on this CPU-only build."""
    # The mode keeps one-element tensors made from Python data as real constants and moves them
    # with the real op, which needs CUDA: make every tensor fake.
    limit = fake_tensor.CONSTANT_NUMEL_LIMIT
    fake_tensor.CONSTANT_NUMEL_LIMIT = 0
    try:
        with _GuardFreeIndexing(), FakeTensorMode() as mode:
            yield mode
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = limit
