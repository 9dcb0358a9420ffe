"""The state machines do no I/O: their import statements name no transport, thread or clock.

Checked on the source with ``ast`` (not by importing), so an import hidden inside a
function counts too. Runners and transports are where I/O belongs (docs/design.md, Architecture).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SANS_IO = [
    "runtime/coordinator.py",
    "runtime/stage.py",
    "runtime/events.py",
    "runtime/kv_cache.py",
    "runtime/stopping.py",
    "runtime/finished.py",
    "runtime/detokenize.py",
    "runtime/sampling.py",
    "runtime/trace.py",
    "runtime/run_stats.py",
]
FORBIDDEN = {
    "torch.distributed",
    "zmq",
    "socket",
    "selectors",
    "threading",
    "multiprocessing",
    "torch.multiprocessing",
    "concurrent",
    "asyncio",
    "subprocess",
    "time",
}


def imported_modules(source: str, package: str = "adadecode.runtime") -> set[str]:
    """Every module an import statement names, with each ``from x import y`` also as ``x.y``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in (*parts, base) if p)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):  # importlib.import_module("x") / __import__("x")
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                found.add(str(node.args[0].value))
    return found


def forbidden_in(modules: set[str]) -> set[str]:
    return {m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)}


@pytest.mark.parametrize("path", SANS_IO)
def test_state_machines_import_no_io(path):
    modules = imported_modules((ROOT / path).read_text())
    assert not forbidden_in(modules), f"{path} imports {sorted(forbidden_in(modules))}"


@pytest.mark.parametrize(
    "source, bad",
    [
        ("import time", {"time"}),
        ("import torch.distributed as dist", {"torch.distributed"}),
        ("from torch import distributed", {"torch.distributed"}),
        ("from torch.distributed import isend", {"torch.distributed", "torch.distributed.isend"}),
        ("import zmq.asyncio", {"zmq.asyncio"}),
        ("from time import perf_counter", {"time", "time.perf_counter"}),
        ("def f():\n    import socket\n", {"socket"}),
        ("from concurrent.futures import Future", {"concurrent.futures", "concurrent.futures.Future"}),
        ("import importlib\nimportlib.import_module('threading')", {"threading"}),
        ("import torch\nfrom .events import WAITING\nfrom . import kv_cache", set()),
        ("import timeit, sockets_helper", set()),  # prefixes of names are not matches
    ],
)
def test_the_import_check_itself(source, bad):
    assert forbidden_in(imported_modules(source)) == bad
