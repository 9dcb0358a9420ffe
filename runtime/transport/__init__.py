"""Transports between ranks: set up and torn down here, and only here.

``open_transport`` is a context manager, torchtitan's ``main()`` pattern: it
joins the process group, opens the data plane (``p2p.py``) and the control
plane (``control.py``), and on the way out — normal or not — tells the other
ranks why, closes the zmq sockets and destroys the process group. A teardown
that itself hangs (a collective library stuck on a dead peer) is cut short by a
hard exit after ``teardown_s``, so that a failing rank never stays behind.

    with open_transport(rank=r, world_size=n, ..., backend="gloo") as t:
        runner = DistributedRunner(stage, t)
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import logging
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .control import ControlClient, ControlServer
from .errors import JobAborted, TransportError
from .p2p import CPU, DataPlane, make_links

__all__ = ["JobAborted", "Transport", "TransportError", "open_transport", "route_address"]

log = logging.getLogger("adadecode.transport")


@dataclass
class Transport:
    rank: int
    world_size: int
    data: DataPlane
    control: ControlServer | ControlClient | None  # None on a single-rank job
    device: torch.device
    hosts: list[str]  # host name of each rank


def route_address(master_addr: str) -> str:
    """This host's address on the route to ``master_addr`` (a UDP connect sends no packet)."""
    family = socket.AF_INET6 if ":" in master_addr else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master_addr, 9))
            return s.getsockname()[0]
        except OSError as e:
            raise TransportError(
                f"cannot find this host's address towards MASTER_ADDR={master_addr}: {e}; "
                "set --transport.control_addr to an address of rank 0's host"
            ) from e


@contextmanager
def open_transport(
    *,
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    backend: str,
    local_rank: int = 0,
    timeout_s: float = 60.0,
    join_timeout_s: float = 600.0,
    hidden_size: int,
    dtype: torch.dtype,
    stage_device: torch.device = CPU,
    control_addr: str = "",
) -> Iterator[Transport]:
    """Join the job and yield this rank's ``Transport``; tear everything down on exit.

    ``stage_device``: where this rank's stage computes. NCCL links live on that GPU (hidden
    states go device to device); gloo links live on the CPU, and with a GPU stage the data
    plane stages hidden states through pinned host memory (said once, at start-up).
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend {backend!r}: expected 'gloo' (CPU) or 'nccl' (GPU)")
    stage_device = torch.device(stage_device)
    if backend == "nccl":
        if stage_device.type != "cuda":
            raise ValueError(f"backend 'nccl' sends GPU tensors, but this rank's stage is on {stage_device}")
        device = stage_device
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if stage_device.type == "cuda":
            torch.cuda.set_device(stage_device)
            log.warning(
                "rank %d: gloo with a stage on %s: hidden states are staged through pinned host memory "
                "at every hop (use transport.backend=nccl with one GPU per rank to send device to device)",
                rank, stage_device,
            )
    timeout = datetime.timedelta(seconds=timeout_s)
    control: ControlServer | ControlClient | None = None
    data: DataPlane | None = None
    try:
        join = datetime.timedelta(seconds=join_timeout_s)
        _init_process_group(backend, rank, world_size, master_addr, master_port, timeout, join)
        hosts = [socket.gethostname()]
        if world_size > 1:
            # One host when every rank has the same name AND the same address towards MASTER_ADDR:
            # nodes of a cluster (or namespaces) may share a host name, never an address.
            gathered: list = [None] * world_size
            _collective(rank, "exchanging host names", dist.all_gather_object, gathered,
                        (socket.gethostname(), route_address(master_addr)))
            hosts = [name for name, _ in gathered]
            server: ControlServer | None = None
            shared: list[object] = [None, None, None]
            if rank == 0:
                one_host = len(set(gathered)) == 1
                host = control_addr or ("127.0.0.1" if one_host else route_address(master_addr))
                control = server = ControlServer(world_size, secrets.token_bytes(32), host, timeout_s)
                shared = [server.key, server.endpoint, server.pulse_endpoint]
            _collective(rank, "receiving rank 0's control-plane endpoint", dist.broadcast_object_list, shared, src=0)
            if server is None:
                key, endpoint, pulse_endpoint = shared
                if not (isinstance(key, bytes) and isinstance(endpoint, str) and isinstance(pulse_endpoint, str)):
                    raise TransportError(f"rank {rank}: rank 0 handed out a malformed control-plane endpoint")
                control = ControlClient(rank, endpoint, key, timeout_s, pulse_endpoint=pulse_endpoint)
            else:
                server.wait_for_peers()
        links = make_links(world_size, backend)
        data = DataPlane(
            rank - 1 if rank > 0 else None,
            rank + 1 if rank < world_size - 1 else None,
            hidden_size, dtype, device, timeout_s,
            recv_group=links[rank - 1] if rank > 0 else None,
            send_group=links[rank] if rank < world_size - 1 else None,
            stage_device=stage_device,
        )
        yield Transport(rank, world_size, data, control, device, hosts)
    except BaseException as e:
        _report(control, e)
        _teardown(data, control, rank, linger_s=1.0, deadline_s=max(1.0, min(5.0, timeout_s / 10)))
        raise
    else:
        _teardown(data, control, rank, linger_s=1.0, deadline_s=max(1.0, min(5.0, timeout_s / 10)))


def _collective(rank: int, what: str, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
    """A set-up collective; a peer that died or cannot be reached is the user's to know, not a bug."""
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:  # DistNetworkError, DistBackendError, gloo's connection errors
        raise TransportError(f"rank {rank}: {what} with the other ranks failed: {e}; another rank has "
                             "probably died (its own output says why) or cannot be reached") from e


def _init_process_group(
    backend: str, rank: int, world_size: int, master_addr: str, master_port: int, timeout: datetime.timedelta,
    join: datetime.timedelta | None = None,
) -> None:
    """Join the job: ranks meet at the rendezvous store within ``join`` (default ``timeout``; the
    ranks come when each has loaded its stage, and a compile warm-up takes minutes), then
    ``timeout`` bounds every collective of the process group."""
    join = timeout if join is None else join
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts it
    if not agent_store and master_port == 0:
        if world_size > 1:
            raise TransportError(f"a {world_size}-rank job needs MASTER_PORT; the launcher did not set it")
        master_addr = "127.0.0.1"  # one process: its own store, on a free port
    host = f"[{master_addr}]" if ":" in master_addr else master_addr
    where = "env://" if agent_store else f"tcp://{host}:{master_port}"
    try:
        store = None if agent_store else _rendezvous_store(rank, world_size, master_addr, master_port, join)
        dist.init_process_group(backend, init_method="env://" if agent_store else None, store=store,
                                rank=rank, world_size=world_size, timeout=timeout)
    except (RuntimeError, ValueError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
        raise TransportError(
            f"rank {rank}: joining the {world_size}-rank job at {where} failed within "
            f"{join.total_seconds():g} s: {e}; another rank died while loading (its own output says "
            "why) or is still loading: raise transport.join_timeout_s for a long load or compile warm-up"
        ) from e


def _rendezvous_store(
    rank: int, world_size: int, master_addr: str, master_port: int, timeout: datetime.timedelta
) -> dist.TCPStore:
    """The job's TCPStore, as torch's ``tcp://`` rendezvous makes it, except where rank 0 listens.

    torch's store listens on every interface, whatever MASTER_ADDR says; anyone who reaches
    the port can read and write the rendezvous. Rank 0 here listens on MASTER_ADDR itself when
    that is an IP address, or ``localhost`` (the ranks connect there and nowhere else). A host
    name keeps torch's every-interface socket: the address it has on other hosts may not be the
    one it resolves to here (Debian maps a host's own name to 127.0.1.1); so does an IP address
    that is not this host's (a container behind a forwarded port), with a warning. Port 0 (one
    process) takes a free port as it binds.
    """
    if rank != 0:
        return dist.TCPStore(master_addr, master_port, world_size, is_master=False, timeout=timeout)
    addr = store_address(master_addr)
    fd, master_port = (None, master_port) if addr is None else _listen(addr, master_port)
    # The store owns the socket from here: it closes it when it ends, or fails.
    return dist.TCPStore(master_addr, master_port, world_size, is_master=True, timeout=timeout, master_listen_fd=fd)


def store_address(master_addr: str) -> str | None:
    """The one address rank 0's rendezvous store listens on, or None: every interface."""
    try:
        return str(ipaddress.ip_address(master_addr))
    except ValueError:
        pass
    if master_addr.lower() == "localhost":  # the address the ranks' own lookup tries first
        addr = socket.getaddrinfo(master_addr, None, type=socket.SOCK_STREAM)[0][4][0]
        assert isinstance(addr, str), "an AF_INET or AF_INET6 address starts with its host, a str"
        return addr
    log.info("MASTER_ADDR=%s is a host name: the rendezvous store listens on every interface "
             "(set MASTER_ADDR to rank 0's IP address to listen on that one only)", master_addr)
    return None


def _listen(addr: str, port: int) -> tuple[int | None, int]:
    """``(fd, port)`` of a socket listening on ``addr:port`` (port 0: a free one); no fd where
    ``addr`` is not an address of this host."""
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's: a port an ended job left
        sock.bind((addr, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRNOTAVAIL:
            log.warning("MASTER_ADDR=%s is not an address of rank 0's host (a forwarded port?): the rendezvous "
                        "store listens on every interface", addr)
            return None, port
        raise TransportError(
            f"rank 0 cannot listen for the rendezvous on MASTER_ADDR={addr} MASTER_PORT={port}: {e}; "
            "set MASTER_PORT to a free port of rank 0's host"
        ) from e
    port = sock.getsockname()[1]
    return sock.detach(), port


def _report(control: ControlServer | ControlClient | None, exc: BaseException) -> None:
    """Tell the others why this rank stops; never raises."""
    reason = "interrupted (KeyboardInterrupt)" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
    try:
        if isinstance(control, ControlServer):
            control.abort(reason)
        elif isinstance(control, ControlClient) and not isinstance(exc, JobAborted):
            control.send("err", reason)
    except Exception:  # noqa: BLE001 - best effort while tearing down: the peer may be gone already
        pass


def _teardown(
    data: DataPlane | None, control: ControlServer | ControlClient | None, rank: int, linger_s: float, deadline_s: float
) -> None:
    """Stop the p2p threads, close zmq, destroy the process group; a hard exit if that hangs."""
    budget = deadline_s + linger_s + 2.0

    def hard_exit() -> None:
        sys.stderr.write(f"adadecode: rank {rank}: teardown did not finish in {budget:g} s; exiting now\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(budget, hard_exit)
    timer.daemon = True
    timer.start()
    try:
        quiet = data.shutdown(deadline_s) if data is not None else True
        if control is not None:
            control.close(linger_s)
        if dist.is_initialized():
            if quiet:
                dist.destroy_process_group()
            else:  # a receive from a hung rank is still blocked: gloo would abort this process
                log.warning("rank %d: a p2p receive is still pending; the process group ends with the process", rank)
    finally:
        timer.cancel()
