"""Two nodes on one machine: two network namespaces joined by a veth pair (10.201.0.1/24 and
10.201.0.2/24, names unique to this test process), each with a host name of its own (a UTS
namespace, and ``/etc/netns/NS/hosts``, which ``ip netns exec`` mounts over /etc/hosts, names
both nodes as a cluster's hosts file does). Every byte between the ranks crosses the veth pair;
nothing leaves the namespaces. Needs root; skipped when ``ip netns`` cannot be used.

- torchrun on each node (``--nnodes 2 --node-rank {0,1} --master-addr 10.201.0.1``) runs
  ``adadecode generate`` with 2 gloo stages: the tokens of one in-process stage; rank 0 listens
  on its address towards MASTER_ADDR only (control plane, heartbeats, gloo), never on loopback
  or every interface. The rendezvous store there is torchrun's own (its agent's, listening on
  every interface: docs/security.md);
- started as torchrun's workers are but without torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT: the path `adadecode generate --stages N`, Slurm and the DeepSpeed
  launcher take), rank 0's own rendezvous store listens on MASTER_ADDR only; then node B is
  torn down mid-decode (the veth pair deleted, then its processes killed, so that no FIN or
  RST ever reaches node A): rank 0 finds it within transport.timeout_s, naming the rank, its
  pid and its host, and exits 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import bundled_greedy_tokens

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Explain rainbows."
NEW_TOKENS = 12
SUBNET = "10.201.0"  # inside the test's own namespaces only: no clash with this host's networks
MASTER_PORT = 29500  # free in a fresh namespace
TIMEOUT_S = 10  # transport.timeout_s of the run whose node B vanishes


@dataclass
class Node:
    ns: str
    veth: str
    host: str
    addr: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def ip(self, *args: str) -> str:
        return _run("ip", "netns", "exec", self.ns, *args)


def _run(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _netns_pids(ns: str) -> list[int]:
    proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in proc.stdout.split()]


@pytest.fixture
def nodes():
    """Two namespaces joined by a veth pair; removed, with every process in them, at the end."""
    if os.geteuid() != 0:
        pytest.skip("two nodes on one machine need root (ip netns, unshare --uts)")
    missing = [t for t in ("ip", "unshare", "ss") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found (apt-get install iproute2 util-linux)")
    stale = re.findall(r"^adadecode-(\d+)-[ab]\b", subprocess.run(["ip", "netns", "list"], capture_output=True,
                       text=True, timeout=30).stdout, re.M)
    _remove([f"adadecode-{pid}-{n}" for pid in set(stale) if not Path(f"/proc/{pid}").exists() for n in "ab"])
    tag = os.getpid()
    a = Node(f"adadecode-{tag}-a", f"adv{tag}a", f"adnode-{tag}-a", f"{SUBNET}.1")
    b = Node(f"adadecode-{tag}-b", f"adv{tag}b", f"adnode-{tag}-b", f"{SUBNET}.2")
    created: list[str] = []
    try:
        for n in (a, b):
            _run("ip", "netns", "add", n.ns)
            created.append(n.ns)
            etc = Path("/etc/netns") / n.ns  # `ip netns exec` mounts these over /etc/ (ip-netns(8))
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{a.addr} {a.host}\n{b.addr} {b.host}\n")
        _run("ip", "link", "add", a.veth, "type", "veth", "peer", "name", b.veth)
        for n in (a, b):
            _run("ip", "link", "set", n.veth, "netns", n.ns)
            _run("ip", "-n", n.ns, "addr", "add", f"{n.addr}/24", "dev", n.veth)
            _run("ip", "-n", n.ns, "link", "set", "lo", "up")
            _run("ip", "-n", n.ns, "link", "set", n.veth, "up")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        subprocess.run(["ip", "link", "del", a.veth], capture_output=True, timeout=30)  # if still out here
        _remove(created)
        pytest.skip(f"cannot make two network namespaces here: {e}")
    try:
        yield a, b
    finally:
        for n in (a, b):
            _stop(n.procs)
        _remove(created)


def _remove(namespaces: list[str]) -> None:
    for ns in namespaces:
        for pid in _netns_pids(ns):  # whatever a failed test left there
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)  # its veth end goes too
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    procs.clear()


def launch(node: Node, argv: list[str], log: Path, host: str | None = None, **env: str) -> subprocess.Popen:
    """``argv`` in ``node``'s namespace under its own host name (or ``host``); stdout to ``log``.out,
    stderr to ``log``.err. ``ip netns exec``, ``unshare`` and ``sh`` exec in turn: the pid is argv's."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "TORCHELASTIC_"))
             and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    clean["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{clean.get('PATH', '')}"
    clean["PYTHONUNBUFFERED"] = "1"
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", node.ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
             host or node.host, *argv],
            stdout=out, stderr=err, cwd=ROOT, env={**clean, **env},
        )
    node.procs.append(proc)
    return proc


class Listening:
    """Polls ``ss -ltnp`` in a namespace while a job runs: every (address, port, pid) seen."""

    def __init__(self, node: Node):
        self.node, self.seen, self._stop = node, set(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            proc = subprocess.run(["ip", "netns", "exec", self.node.ns, "ss", "-Hltnp"], capture_output=True,
                                  text=True, timeout=30)
            for line in proc.stdout.splitlines():
                local = line.split()[3]
                addr, port = local.rsplit(":", 1)
                for pid in re.findall(r"pid=(\d+)", line):
                    self.seen.add((addr.strip("[]"), int(port), int(pid)))
            self._stop.wait(0.2)

    def stop(self) -> set[tuple[str, int, int]]:
        self._stop.set()
        self._thread.join()
        return self.seen


@pytest.fixture(scope="module")
def reference() -> list[int]:
    """The prompt's greedy tokens from one in-process stage of the bundled model."""
    return bundled_greedy_tokens(PROMPT, NEW_TOKENS)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return found


def _veth_bytes(node: Node) -> int:
    return int(node.ip("cat", f"/sys/class/net/{node.veth}/statistics/tx_bytes"))


@pytest.mark.timeout(300)
def test_torchrun_on_two_nodes_gives_one_stages_tokens_and_binds_the_routed_address(nodes, reference, tmp_path):
    """Both nodes under the same host name, as cluster images can be: the ranks tell hosts apart
    by their addresses towards MASTER_ADDR, so rank 0 does not take them for one host (loopback)."""
    a, b = nodes
    sent = _veth_bytes(a)
    generate = ["adadecode", "generate", "--stages", "2", "--prompt", PROMPT, "--chat",
                "--max-new-tokens", str(NEW_TOKENS), "--json"]
    seen = Listening(a)
    try:
        agents = [
            launch(n, [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                       "--node-rank", str(i), "--master-addr", a.addr, "--master-port", str(MASTER_PORT),
                       "--no-python", *generate], tmp_path / f"node{i}", host=a.host)
            for i, n in enumerate((a, b))
        ]
        rank0 = None
        end = time.monotonic() + 240
        while any(p.poll() is None for p in agents) and time.monotonic() < end:
            rank0 = rank0 or next(iter(_children(agents[0].pid)), None)  # torchrun's worker on node A
            time.sleep(0.1)
        for p in agents:
            if p.poll() is None:
                p.kill()
            p.wait()
    finally:
        listening = seen.stop()
    logs = {i: (tmp_path / f"node{i}.out").read_text() + (tmp_path / f"node{i}.err").read_text() for i in (0, 1)}
    assert [p.returncode for p in agents] == [0, 0], logs
    records = [json.loads(line) for line in logs[0].splitlines() if line.startswith("{")]
    assert len(records) == 1, logs[0]
    assert records[0]["tokens"] == reference
    assert records[0]["stats"]["stages"] == [[0, 19], [19, 30]]
    assert _veth_bytes(a) - sent > 50_000, "the ranks did not talk over the veth pair"  # hidden states, 12 x 2.3 KB+

    # Rank 0's sockets: the control plane and heartbeats (zmq) and gloo's, on the address of the
    # interface that routes to MASTER_ADDR, and nowhere else.
    route = a.ip("ip", "-o", "route", "get", a.addr)
    routed = re.search(r"\bsrc (\S+)", route).group(1)
    assert routed == a.addr, route
    mine = {(addr, port) for addr, port, pid in listening if pid == rank0}
    assert rank0 is not None and len(mine) >= 2, listening
    assert {addr for addr, _ in mine} == {routed}, listening
    # torchrun's agent (the process launched on node A) hosts the rendezvous store itself.
    assert {port for _, port, pid in listening if pid == agents[0].pid} == {MASTER_PORT}, listening


@pytest.mark.timeout(300)
def test_a_node_that_vanishes_is_named_within_the_timeout(nodes, tmp_path):
    a, b = nodes
    seen = Listening(a)
    ranks = [
        launch(n, ["adadecode", "generate", "--stages", "2", "--prompt", PROMPT, "--chat", "--max-new-tokens", "400",
                   "--model.max_seq_len=512", "--decoding.heads=none", f"--transport.timeout_s={TIMEOUT_S}"],
               tmp_path / f"rank{r}", RANK=str(r), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR=a.addr, MASTER_PORT=str(MASTER_PORT))
        for r, n in enumerate((a, b))
    ]
    out0 = tmp_path / "rank0.out"
    try:
        end = time.monotonic() + 180
        while not out0.read_text().strip() and all(p.poll() is None for p in ranks) and time.monotonic() < end:
            time.sleep(0.1)  # the text streams once both ranks decode
    finally:
        listening = seen.stop()
    assert out0.read_text().strip(), (tmp_path / "rank0.err").read_text() + (tmp_path / "rank1.err").read_text()
    # Rank 0's own rendezvous store: on MASTER_ADDR, and only there.
    assert {addr for addr, port, pid in listening if port == MASTER_PORT} == {a.addr}, listening
    assert {pid for _, port, pid in listening if port == MASTER_PORT} == {ranks[0].pid}, listening

    # Node B vanishes: its cable first (no FIN or RST can reach node A), then its processes.
    victim = ranks[1].pid
    a.ip("ip", "link", "del", a.veth)  # deletes both ends of the pair
    gone = time.monotonic()
    for pid in _netns_pids(b.ns):
        os.kill(pid, signal.SIGKILL)
    try:
        ranks[0].wait(timeout=TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        pass
    found = time.monotonic() - gone
    _stop(a.procs + b.procs)
    err = (tmp_path / "rank0.err").read_text()
    assert ranks[0].returncode == 2, err
    silent = re.search(rf"adadecode: error: rank 0: rank 1 \(pid {victim} on {b.host}\) has sent nothing for "
                       r"([\d.]+) s \(.*\): it hangs or is unreachable", err)
    assert silent, err
    # Declared lost after 0.8 x timeout_s of silence (heartbeats every timeout_s / 10), then an
    # orderly teardown of at most about 2 s at this timeout (runtime/transport/__init__.py).
    assert 0.8 * TIMEOUT_S <= float(silent.group(1)) < TIMEOUT_S, err
    assert found < TIMEOUT_S + 3, found
    assert _netns_pids(a.ns) == [] and _netns_pids(b.ns) == []
