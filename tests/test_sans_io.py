"""The state machines do no I/O: their import statements name no transport, thread or clock.

Checked on the source with ``ast`` (not by importing), so an import hidden inside a
function counts too; and transitively, by importing them in a fresh interpreter: what they
load must hold no model loader, model code, runner, transport or simulator, and every module
of ours among it passes the source check as well. Runners and transports are where I/O
belongs (docs/design.md, Architecture).
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SANS_IO = [
    "runtime/coordinator.py",
    "runtime/stage.py",
    "runtime/work_queue.py",
    "runtime/token_choice.py",
    "runtime/stage_model.py",
    "runtime/stage_stats.py",
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
    "fcntl",
    "tempfile",
}
# Nor may they load these through any chain of imports: the model loader (file locks, temp
# files), the model code and transformers, the runners, transports and simulator, the launcher.
NOT_LOADED = FORBIDDEN | {
    "adadecode.runtime.model_source",
    "adadecode.runtime.model_runner",
    "adadecode.runtime.hf_adapter",
    "transformers",
    "adadecode.runtime.loading",
    "adadecode.runtime.engine",
    "adadecode.runtime.serving",
    "adadecode.runtime.runners",
    "adadecode.runtime.transport",
    "adadecode.runtime.sim",
    "adadecode.launcher",
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


def forbidden_in(modules: set[str], forbidden: set[str] = FORBIDDEN) -> set[str]:
    return {m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden)}


@functools.cache
def loaded_beyond_torch(modules: tuple[str, ...]) -> dict[str, str | None]:
    """What importing ``modules`` in a fresh interpreter loads beyond ``import torch``, each with its
    file. torch itself loads socket, subprocess, tempfile, fcntl and torch.distributed, so those
    cannot show here: ``io_imports`` catches them in the source of each module of ours instead."""
    code = "\n".join([
        "import json, sys, torch",
        "before = set(sys.modules)",
        *(f"import {m}" for m in modules),
        "print(json.dumps({m: getattr(sys.modules[m], '__file__', None) for m in set(sys.modules) - before}))",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def io_imports(loaded: dict[str, str | None]) -> dict[str, set[str]]:
    """The forbidden imports in the source of each module of ours in ``loaded``."""
    found = {}
    for name, file in loaded.items():
        if name.startswith("adadecode.") and file is not None:
            package = name if file.endswith("__init__.py") else name.rpartition(".")[0]
            found[name] = forbidden_in(imported_modules(Path(file).read_text(), package))
    return {name: bad for name, bad in found.items() if bad}


STATE_MACHINE_MODULES = tuple("adadecode." + path.removesuffix(".py").replace("/", ".") for path in SANS_IO)


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


def test_importing_the_state_machines_loads_no_model_code_runner_or_io():
    loaded = loaded_beyond_torch(STATE_MACHINE_MODULES)
    bad = forbidden_in(set(loaded), NOT_LOADED)
    # the chain that pulls one in: python -X importtime -c "import adadecode.runtime.stage"
    assert not bad, f"they load {sorted(m for m in bad if m.rpartition('.')[0] not in bad)}"
    assert not io_imports(loaded), f"modules they load import {io_imports(loaded)}"


def test_the_transitive_check_itself():
    # the model loader, the module the Stage used to pull in through the model runner
    loaded = loaded_beyond_torch(("adadecode.runtime.model_source",))
    assert "adadecode.runtime.model_source" in forbidden_in(set(loaded), NOT_LOADED)
    assert {"fcntl", "tempfile", "time"} <= io_imports(loaded)["adadecode.runtime.model_source"]
