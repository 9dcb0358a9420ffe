"""The `adadecode serve` command: the start-up memory check, the HTTP front end, serving until stopped.

``cmd_serve`` (launcher/cli.py) hands ``launcher.launch.launch`` two things from here:
``check_cache_memory`` (run before anything loads or spawns) and ``serving``, which the
process that gets the engine enters before the model loads: ``http_frontend`` listens
(HTTP 503 while the model loads), then ``serve_requests`` runs until a signal or a lost
rank. The app is launcher/serve/app.py, uvicorn launcher/serve/http_server.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from adadecode.runtime.sampling import SamplingParams

from ..config import ConfigError, RunConfig
from .app import Frontend, ServeDefaults, build_app
from .http_server import HttpLimits, HttpServer

if TYPE_CHECKING:
    from adadecode.runtime.engine import Engine

    from ..distributed import LaunchPlan


@contextlib.contextmanager
def serving(cfg: RunConfig) -> Iterator[Callable[[Engine], int]]:
    """Listen before the model loads (``/health`` answers 503 meanwhile); yield what serves with the engine."""
    with http_frontend(cfg) as frontend:
        yield lambda engine: serve_requests(frontend, engine, cfg)


def serve_requests(frontend: Frontend, engine: Engine, cfg: RunConfig) -> int:
    """Main thread, once ``engine`` is loaded: run the ``ServingLoop`` until a signal or a lost rank.

    SIGTERM ends serving gracefully (status 0; a pipeline's other ranks are shut down in
    order); SIGINT as for `generate` (status 130). A lost rank raises ``TransportError``.
    """
    from adadecode.runtime.serving import ServingLoop
    from adadecode.runtime.transport.errors import TransportError

    s, d = cfg.serve, cfg.decoding
    if d.early_exit != "off" and not engine.early_exit_off_here and not engine.starts_early(None):  # greedy default
        raise ValueError(
            f"decoding.early_exit = {d.early_exit!r} is every request's default, but no exit heads are loaded "
            "and no lookup drafts run here; set decoding.heads (`adadecode train-heads`), decoding.draft, "
            "or use --early-exit off"
        )
    below = s.early_exit_below or max(2, len(engine.layer_ranges))
    if threading.current_thread() is threading.main_thread():
        # Before `ready` is printed, which a scheduler or a test may answer with SIGTERM at once:
        # after it, the default action would end this rank with the others still waiting on it.
        # Left in place to the end: a second SIGTERM (the launcher passing on one this process
        # got as well) must not kill the shutdown under way.
        signal.signal(signal.SIGTERM, lambda *_: frontend.done.set())
    loop = ServingLoop(engine, max_num_seqs=s.max_num_seqs, max_queue=s.max_queue, early_exit_below=below).start()
    frontend.attach(engine, loop)
    layers = ", ".join(f"[{a}, {b})" for a, b in engine.layer_ranges)
    print(f"adadecode: ready: {len(engine.stages)} stage(s) {layers}, {s.max_num_seqs} sequences at once, "
          f"early exit {d.early_exit} by default, while fewer than {below} sequences run", file=sys.stderr, flush=True)
    try:
        while not frontend.done.wait(0.5):
            pass
    finally:
        frontend.shutdown()
    if frontend.state == "failed":
        raise TransportError(f"serving stopped: {frontend.error}")
    return 0


@contextlib.contextmanager
def http_frontend(cfg: RunConfig):
    """Listen (HTTP 503 while the model loads), print the address; stop the server on the way out."""
    s, d = cfg.serve, cfg.decoding
    name = s.served_model_name or served_name(cfg.model.source)
    api_key = s.api_key or os.environ.get("ADADECODE_API_KEY", "")
    defaults = ServeDefaults(
        model_name=name, max_tokens=d.max_new_tokens, early_exit=d.early_exit, stop=tuple(d.stop),
        sampling=SamplingParams(**dataclasses.asdict(cfg.sampling)),
        max_seq_len=cfg.model.max_seq_len, failed_linger_s=min(5.0, cfg.transport.timeout_s / 4),
        api_key=api_key, metrics_public=s.metrics_public,
    )
    frontend = Frontend(defaults)
    limits = HttpLimits(s.max_connections, s.read_timeout_s, s.send_timeout_s)
    http = HttpServer(build_app(frontend), s.host, s.port, log_level=cfg.logging.level, limits=limits).start()
    print(f"adadecode: serving {name} on {http.url} (pid {os.getpid()})", file=sys.stderr, flush=True)
    if cfg.pipeline.compile == "on":  # `serve`'s default (launcher/cli.py): say why `ready` takes minutes
        print("adadecode: compiling every stage before it is ready (minutes on a CPU; --pipeline.compile=off "
              "starts in seconds)", file=sys.stderr, flush=True)
    if not api_key and not is_loopback(s.host):
        print(f"adadecode: warning: listening on {s.host} without an API key: anyone who reaches this port can "
              "use the model; set ADADECODE_API_KEY (or --api-key) to require `Authorization: Bearer <key>`",
              file=sys.stderr, flush=True)
    try:
        yield frontend
    finally:
        frontend.shutdown()
        http.stop()


def served_name(source: str) -> str:
    """The name a model is served under by default: never a filesystem path, which would tell
    every client how the server's disk is laid out. ``bundled:NAME`` -> NAME; a local directory
    or file -> its name (a ``.gguf`` file without the suffix); anything else (a Hub id) as is."""
    if source.startswith("bundled:"):
        return source.removeprefix("bundled:")
    path = Path(source).expanduser()
    if path.exists():
        return path.stem if path.suffix == ".gguf" else path.resolve().name
    return source


def is_loopback(host: str) -> bool:
    """Whether ``host`` only ever accepts connections from this machine."""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------- memory at start-up


def kv_cache_bytes(config, ranges, slots: int, max_seq_len: int, itemsize: int) -> list[int]:
    """KV cache bytes of each stage: keys and values of every layer, slot and position."""
    from adadecode.runtime.hf_adapter import ModelArgs
    from adadecode.runtime.kv_cache import kv_bytes_per_position

    args = ModelArgs.from_hf_config(config)
    per_layer = slots * max_seq_len * kv_bytes_per_position(args.num_kv_heads, args.head_dim, itemsize)
    return [(b - a) * per_layer for a, b in ranges]


def free_memory(device) -> tuple[int, str] | None:
    """Free bytes on ``device`` and where the number comes from; None when unknown."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0], f"torch.cuda.mem_get_info({device})"
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, StopIteration, ValueError):
        return None


def check_cache_memory(cfg: RunConfig, plan: LaunchPlan, config, ranges, free: Callable = free_memory) -> None:
    """Refuse to start when the KV cache of ``serve.max_num_seqs`` slots cannot fit free memory.

    ``config``: the model's HF config; ``ranges``: each stage's layers. The stages this process
    (or, with ``--stages N``, this node) will hold are summed per device: every CPU stage
    shares host RAM; a GPU holds its own rank's stage.
    """
    from adadecode.runtime.device import check_placement, dtype_name

    m, s = cfg.model, cfg.serve
    if plan.mode == "spawn":
        mine = [(r, r, plan.world_size) for r in range(plan.world_size)]
    elif plan.mode == "rank":
        env = plan.env
        mine = [(env.rank, env.local_rank, env.local_world_size or env.local_rank + 1)]
    else:
        mine = [(r, 0, 1) for r in range(len(ranges))]
    by_device: dict = {}
    for stage, local_rank, local_world in mine:
        device, dtype = check_placement(m.device, m.dtype, plan.backend if plan.mode != "inprocess" else "inprocess",
                                        local_rank=local_rank, local_world_size=local_world)
        size = kv_cache_bytes(config, ranges[stage : stage + 1], s.max_num_seqs, m.max_seq_len, dtype.itemsize)[0]
        entry = by_device.setdefault(str(device), [device, dtype, 0, 0])
        entry[2] += size
        entry[3] += 1
    for name, (device, dtype, need, stages) in by_device.items():
        got = free(device)
        if got is None or need <= got[0]:
            continue
        per_slot = need / s.max_num_seqs
        fits = int(got[0] // per_slot)
        raise ConfigError(
            f"serve.max_num_seqs = {s.max_num_seqs} needs {need / 2**30:.2f} GiB of KV cache on {name} "
            f"({stages} stage(s), {s.max_num_seqs} slots x {m.max_seq_len} positions in {dtype_name(dtype)}), "
            f"but only {got[0] / 2**30:.2f} GiB is free ({got[1]}); lower --serve.max_num_seqs "
            f"(at most {fits} fit{'s' if fits == 1 else ''}) or --model.max_seq_len, or free memory",
            key="serve.max_num_seqs",
        )
