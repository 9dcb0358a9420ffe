"""Data plane: hidden states between neighbouring stages over torch.distributed p2p.

Each message is two or three tensors, sent with separate ``isend`` calls
(never coalesced, so a later item is not held behind an earlier one):

- a fixed header, int64 [23]: ``seq, epoch, pos, layer, S, predict_from,
  emitted, early_exit, temperature, top_p, top_k, min_p, seed, sampling,
  repetition_penalty, presence_penalty, frequency_penalty, logprobs,
  prompt_logprobs, proposals, tokens, lookup, kind`` — every field of ``Activations``
  except the tensor (``early_exit`` as its index in ``EARLY_EXIT_MODES``, -1 for
  None; the ``SamplingParams`` as its fields, floats as their float64 bits, the
  mode as its index in ``SAMPLING_MODES``, -1 for None; ``logprobs`` and
  ``prompt_logprobs`` -1 for None; ``lookup`` -1 for none), plus the chunk length ``S``, the lengths of
  the proposals and of the token ids in the extras tensor (0 and 0: none sent)
  and the message kind (``KIND_ACTIVATIONS``, or ``KIND_STOP``: the upstream
  neighbour's orderly goodbye);
- the hidden states, [S, D] in the model dtype (absent for ``KIND_STOP``);
- extras, only when the item carries exit heads' proposals (speculative
  sampling) or token ids (``SamplingParams.needs_tokens``): float64
  [proposals + tokens], each proposal as ``pos, token, n, ids[n], probs[n]``,
  then the token ids (ids are exact in float64; probs are float32 values).

Receiving: a thread keeps the next header receive posted at all times. When a
header arrives it posts the receive for its [S, D] tensor (and its proposals)
and, right after, the next header's (posting order = sending order, which NCCL needs; gloo also
gets distinct tags), then waits for the hidden states and hands the
``Activations`` to the rank's loop through a queue, writing one byte to a pipe
so that the loop can sleep in ``zmq.poll`` on that pipe and the control socket
together. Why a thread: gloo's p2p ``Work.is_completed()`` only turns true
inside ``wait()``, and a ``wait(timeout)`` that expires closes the link, so
completion can only be learnt by a blocking ``wait()``.

Sending: ``send()`` calls ``isend`` and returns; a second thread waits for each
send in order and releases its tensors. A send pending for ``timeout_s``, or
one that failed, raises ``TransportError`` naming the peer on the rank's next
``poll()`` / ``reap()``.

Devices. With NCCL the link lives on the stage's GPU: the header and the hidden
states are sent from and received into device memory, the header is built in
pinned host memory and copied up without blocking, and the only device-to-host
read is the received header (in the receive thread, on its own stream: it needs
``S`` to post the next receive). With gloo and a GPU stage (ranks sharing one
GPU, or nodes without NCCL) the link lives on the CPU: the send thread copies
the hidden states into pinned memory after the compute that made them (an event,
not a device-wide sync) and only then sends; the receive thread copies received
states up to the GPU on its own stream. Nothing blocks the compute thread.

The links live in their own two-rank process groups whose timeout is long:
an idle link is not an error (rank 0 may wait minutes between requests);
liveness is the control plane's job (a gloo receive from a killed process
never completes, it does not fail).
"""

from __future__ import annotations

import datetime
import os
import queue
import struct
import threading
import time
from collections import deque
from dataclasses import fields

import torch
import torch.distributed as dist

from ..events import EARLY_EXIT_MODES, Activations
from ..sampling import SAMPLING_MODES, Proposal, SamplingParams
from .errors import TransportError

CPU = torch.device("cpu")  # a stage's default device (a module constant: devices are immutable)

HEADER_FIELDS = (
    "seq", "epoch", "pos", "layer", "S", "predict_from", "emitted", "early_exit",
    "temperature", "top_p", "top_k", "min_p", "seed", "sampling",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs", "prompt_logprobs",
    "proposals", "tokens", "lookup", "kind",
)
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty", "presence_penalty",
                    "frequency_penalty", "logprobs", "prompt_logprobs")
_FLOATS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}
KIND_ACTIVATIONS = 1
KIND_STOP = 2
_TAG_HEADER = 1
_TAG_HIDDEN = 2
_TAG_PROPOSALS = 3
LINK_TIMEOUT = datetime.timedelta(days=365)  # see the module docstring: idle is not dead

# The header must carry every field of Activations: fail loudly the day one is added.
_CARRIED = {"seq", "epoch", "pos", "layer", "hidden", "predict_from", "emitted", "early_exit", "sampling", "proposals",
            "tokens", "lookup"}
_HAS = {f.name for f in fields(Activations)}
if _HAS != _CARRIED:
    raise ImportError(
        f"runtime/transport/p2p.py carries Activations fields {sorted(_CARRIED)} but Activations has "
        f"{sorted(_HAS)}; extend HEADER_FIELDS, encode_header and decode_header"
    )


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _sampling_values(sp: SamplingParams | None) -> dict[str, int]:
    if sp is None:
        return {name: 0 for name in _SAMPLING_FIELDS} | {"sampling": -1, "logprobs": -1, "prompt_logprobs": -1}
    values = {name: _bits(getattr(sp, name)) if name in _FLOATS else getattr(sp, name) for name in _SAMPLING_FIELDS}
    for name in ("logprobs", "prompt_logprobs"):
        values[name] = -1 if values[name] is None else values[name]
    return values | {"sampling": SAMPLING_MODES.index(sp.mode)}


def encode_header(act: Activations | None, proposals: int = 0) -> torch.Tensor:
    """The int64 [23] header of ``act`` (``proposals``: the length of the proposals in its extras
    tensor; its token ids follow them), or of a stop message for ``None``."""
    if act is None:
        values = {name: 0 for name in HEADER_FIELDS} | _sampling_values(None) | {
            "early_exit": -1, "lookup": -1, "kind": KIND_STOP}
    else:
        values = {
            "seq": act.seq, "epoch": act.epoch, "pos": act.pos, "layer": act.layer, "S": act.hidden.shape[0],
            "predict_from": act.predict_from, "emitted": int(act.emitted),
            "early_exit": -1 if act.early_exit is None else EARLY_EXIT_MODES.index(act.early_exit),
            **_sampling_values(act.sampling), "proposals": proposals, "tokens": len(act.tokens),
            "lookup": act.lookup, "kind": KIND_ACTIVATIONS,
        }
    return torch.tensor([values[name] for name in HEADER_FIELDS], dtype=torch.int64)


def decode_header(header: torch.Tensor) -> dict:
    """The header's fields; ``sampling`` decoded to a ``SamplingParams`` or None (the float fields
    are then dropped)."""
    values = header.tolist()
    if len(values) != len(HEADER_FIELDS):
        raise TransportError(f"data-plane header has {len(values)} fields, expected {len(HEADER_FIELDS)}")
    head = dict(zip(HEADER_FIELDS, values))
    if not -1 <= head["early_exit"] < len(EARLY_EXIT_MODES):
        raise TransportError(
            f"data-plane header carries early_exit {head['early_exit']}, not an EARLY_EXIT_MODES index")
    if (not -1 <= head["sampling"] < len(SAMPLING_MODES) or head["proposals"] < 0 or head["tokens"] < 0
            or head["lookup"] < -1):
        raise TransportError(f"malformed sampling fields in a data-plane header: {head}")
    given = {k: head.pop(k) for k in _SAMPLING_FIELDS}
    if head["sampling"] >= 0:
        kw: dict = {k: _float(v) if k in _FLOATS else v for k, v in given.items()}
        for k in ("logprobs", "prompt_logprobs"):
            kw[k] = None if kw[k] == -1 else kw[k]
        try:
            head["sampling"] = SamplingParams(mode=SAMPLING_MODES[head["sampling"]], **kw)
        except ValueError as e:
            raise TransportError(f"data-plane header carries invalid sampling parameters: {e}") from e
    else:
        head["sampling"] = None
    return head


def encode_proposals(proposals: tuple[Proposal, ...]) -> torch.Tensor:
    """float64 [n]: ``pos, token, len, ids..., probs...`` per proposal (see the module docstring)."""
    values: list[float] = []
    for p in proposals:
        values += [p.pos, p.token, len(p.ids), *p.ids, *p.probs]
    return torch.tensor(values, dtype=torch.float64)


def decode_extras(values: torch.Tensor, tokens: int) -> tuple[tuple[Proposal, ...], tuple[int, ...]]:
    """The proposals and the ``tokens`` token ids of an extras tensor."""
    flat = values.tolist()
    if not 0 <= tokens <= len(flat):
        raise TransportError(f"an extras tensor of {len(flat)} values cannot hold {tokens} token ids")
    cut = len(flat) - tokens
    return decode_proposals(values[:cut]), tuple(int(x) for x in flat[cut:])


def decode_proposals(values: torch.Tensor) -> tuple[Proposal, ...]:
    flat, out, i = values.tolist(), [], 0
    while i < len(flat):
        pos, token, n = int(flat[i]), int(flat[i + 1]), int(flat[i + 2])
        ids, probs = flat[i + 3 : i + 3 + n], flat[i + 3 + n : i + 3 + 2 * n]
        if len(probs) != n:
            raise TransportError(f"truncated proposals tensor ({len(flat)} values)")
        out.append(Proposal(pos, token, tuple(int(x) for x in ids), tuple(probs)))
        i += 3 + 2 * n
    return tuple(out)


def _link_error(what: str, peer: int | None, exc: BaseException) -> TransportError:
    text = str(exc)
    if "closed by peer" in text or "reset by peer" in text:  # gloo's words for a vanished process
        return TransportError(f"rank {peer} closed its data-plane connection: the process died")
    return TransportError(f"{what} rank {peer} failed: {text.splitlines()[0] if text else type(exc).__name__}")


def make_links(world_size: int, backend: str) -> list[dist.ProcessGroup]:
    """One two-rank process group per neighbouring pair (every rank must call this, in order)."""
    return [dist.new_group([i, i + 1], timeout=LINK_TIMEOUT, backend=backend) for i in range(world_size - 1)]


def _posted(work: dist.Work | None) -> dist.Work:
    """The handle of an ``isend`` / ``irecv`` on a link; torch returns None only to a rank
    outside the link's group, and a link's group is the two ranks that use it."""
    assert work is not None, "this rank is a member of its link's two-rank group"
    return work


class DataPlane:
    """This rank's p2p links: receive from ``prev_rank``, send to ``next_rank`` (either may be None)."""

    def __init__(
        self,
        prev_rank: int | None,
        next_rank: int | None,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        timeout_s: float,
        recv_group: dist.ProcessGroup | None = None,
        send_group: dist.ProcessGroup | None = None,
        stage_device: torch.device = CPU,
    ):
        """``device``: where the link's tensors live (a GPU for NCCL); ``stage_device``:
        where received hidden states are handed over (the stage's compute device)."""
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.stage_device = stage_device
        self._staging = device.type == "cpu" and stage_device.type == "cuda"  # gloo with a GPU stage
        self.timeout_s = timeout_s
        self.recv_group, self.send_group = recv_group, send_group
        self.stopped = prev_rank is None  # True once the upstream neighbour said goodbye
        self.bytes_sent = 0
        self._closing = False
        self._stop_sent = False
        # Received items: an Activations, None (the upstream neighbour's goodbye) or the error
        # that ended the receive thread.
        self._inbox: queue.SimpleQueue[Activations | BaseException | None] = queue.SimpleQueue()
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        self._sends: deque[float] = deque()  # start times of sends in flight, oldest first
        self._send_q: queue.SimpleQueue = queue.SimpleQueue()
        self._send_error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        if prev_rank is not None:
            self._threads.append(threading.Thread(target=self._receive_loop, name="adadecode-recv", daemon=True))
        if next_rank is not None:
            self._threads.append(threading.Thread(target=self._send_loop, name="adadecode-send", daemon=True))
        for t in self._threads:
            t.start()

    def fileno(self) -> int:
        """Readable when ``poll()`` has something (for ``zmq.Poller`` / ``select``)."""
        return self._rfd

    # --- receive ----------------------------------------------------------------------

    def _complete(self, work: dist.Work) -> None:
        if self.device.type == "cuda":  # NCCL's wait() only orders streams; ask the event instead
            while not work.is_completed():
                time.sleep(20e-6)
        else:
            work.wait()

    def _receive_loop(self) -> None:
        try:
            cuda_link = self.device.type == "cuda"
            side = None
            if cuda_link or self.stage_device.type == "cuda":
                torch.cuda.set_device(self.device if cuda_link else self.stage_device)
                side = torch.cuda.Stream()  # header reads and uploads never wait behind compute
            host_header = torch.empty(len(HEADER_FIELDS), dtype=torch.int64, pin_memory=cuda_link)
            header = torch.empty(len(HEADER_FIELDS), dtype=torch.int64, device=self.device)
            header_work = _posted(dist.irecv(header, src=self.prev_rank, group=self.recv_group, tag=_TAG_HEADER))
            while True:
                self._complete(header_work)
                if cuda_link:
                    assert side is not None, "made above for a CUDA link"
                    with torch.cuda.stream(side):
                        host_header.copy_(header, non_blocking=True)
                    side.synchronize()
                    head = decode_header(host_header)
                else:
                    head = decode_header(header)
                if head["kind"] == KIND_STOP:
                    self._deliver(None)
                    return
                if head["kind"] != KIND_ACTIVATIONS or head["S"] < 1:
                    raise TransportError(f"malformed data-plane header from rank {self.prev_rank}: {head}")
                pinned = self.device.type == "cpu" and self.stage_device.type == "cuda"
                hidden = torch.empty(
                    head["S"], self.hidden_size, dtype=self.dtype, device=self.device, pin_memory=pinned
                )
                hidden_work = _posted(dist.irecv(hidden, src=self.prev_rank, group=self.recv_group, tag=_TAG_HIDDEN))
                incoming: tuple[torch.Tensor, dist.Work] | None = None  # the extras, and their receive
                if head["proposals"] or head["tokens"]:
                    packed = torch.empty(head["proposals"] + head["tokens"], dtype=torch.float64, device=self.device)
                    incoming = packed, _posted(dist.irecv(packed, src=self.prev_rank, group=self.recv_group,
                                                          tag=_TAG_PROPOSALS))
                header = torch.empty(len(HEADER_FIELDS), dtype=torch.int64, device=self.device)
                header_work = _posted(dist.irecv(header, src=self.prev_rank, group=self.recv_group, tag=_TAG_HEADER))
                self._complete(hidden_work)
                if pinned:  # gloo into pinned host memory, then up to the stage's GPU
                    assert side is not None, "made above for a stage on a GPU"
                    with torch.cuda.stream(side):
                        hidden = hidden.to(self.stage_device, non_blocking=True)
                    side.synchronize()
                    hidden.record_stream(torch.cuda.default_stream(self.stage_device))  # compute reads it there
                else:
                    hidden = hidden.to(self.stage_device)  # no-op when the link is on the stage's device
                proposals: tuple[Proposal, ...] = ()
                tokens: tuple[int, ...] = ()
                if incoming is not None:  # the host needs them (the last stage's decision)
                    packed, proposals_work = incoming
                    self._complete(proposals_work)
                    if cuda_link:
                        with torch.cuda.stream(side):
                            packed = packed.cpu()
                    proposals, tokens = decode_extras(packed, head["tokens"])
                self._deliver(
                    Activations(
                        head["seq"], head["epoch"], head["pos"], head["layer"], hidden,
                        predict_from=head["predict_from"], emitted=bool(head["emitted"]),
                        early_exit=None if head["early_exit"] < 0 else EARLY_EXIT_MODES[head["early_exit"]],
                        sampling=head["sampling"], proposals=proposals, tokens=tokens, lookup=head["lookup"],
                    )
                )
        except BaseException as e:  # noqa: BLE001 - handed to the rank's loop, which raises it
            if not self._closing:
                self._deliver(e)

    def _deliver(self, item: Activations | BaseException | None) -> None:
        self._inbox.put(item)
        try:
            os.write(self._wfd, b"\0")
        except OSError:  # closed during teardown
            pass

    def poll(self) -> list[Activations]:
        """Every item that has fully arrived, in order; never blocks."""
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        got: list[Activations] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.stopped = True
            elif isinstance(item, BaseException):
                raise _link_error("receiving from", self.prev_rank, item) from item
            else:
                got.append(item)
        self.reap()
        return got

    # --- send -----------------------------------------------------------------------------

    def send(self, act: Activations) -> None:
        """Start sending ``act`` to the next stage; returns at once, without a device sync."""
        self.reap()
        hidden = act.hidden.contiguous()
        proposals = encode_proposals(act.proposals) if act.proposals else None
        header = encode_header(act, 0 if proposals is None else proposals.numel())
        if act.tokens:  # after the proposals, in the same extras tensor
            ids = torch.tensor(act.tokens, dtype=torch.float64)
            proposals = ids if proposals is None else torch.cat([proposals, ids])
        self.bytes_sent += hidden.numel() * hidden.element_size()
        if proposals is not None:
            self.bytes_sent += proposals.numel() * 8
        if self._staging:
            # gloo and a GPU stage: the send thread copies to pinned memory once the compute
            # that made the states is done (an event), then sends header, states and proposals in order.
            staged = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            staged.copy_(hidden, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._sends.append(time.monotonic())
            self._send_q.put(("staged", header, staged, done, proposals))
            return
        self._isend(self._on_link(header), _TAG_HEADER)
        self._isend(hidden.to(self.device), _TAG_HIDDEN)
        if proposals is not None:
            self._isend(self._on_link(proposals), _TAG_PROPOSALS)

    def _on_link(self, tensor: torch.Tensor) -> torch.Tensor:
        """A small host tensor (a header, proposals) on the link's device."""
        if self.device.type == "cuda":  # pinned, so the upload is asynchronous
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def send_stop(self) -> None:
        """Tell the next stage that nothing follows (its posted header receive completes)."""
        if self.next_rank is not None and not self._stop_sent:
            self._stop_sent = True
            if self._staging:  # behind the staged sends, in order
                self._sends.append(time.monotonic())
                self._send_q.put(("staged", encode_header(None), None, None, None))
            else:
                self._isend(self._on_link(encode_header(None)), _TAG_HEADER)

    def _isend(self, tensor: torch.Tensor, tag: int) -> None:
        try:
            work = dist.isend(tensor, dst=self.next_rank, group=self.send_group, tag=tag)
        except RuntimeError as e:
            raise TransportError(f"sending to rank {self.next_rank} failed: {e}") from e
        self._sends.append(time.monotonic())
        self._send_q.put(("work", work, tensor))  # the tensor lives until the send completes

    def _send_loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            item = self._send_q.get()
            if item is None:
                return
            try:
                if item[0] == "staged":
                    _, header, staged, done, proposals = item
                    if done is not None:
                        done.synchronize()  # the copy to pinned memory, not the whole device
                    for tensor, tag in ((header, _TAG_HEADER), (staged, _TAG_HIDDEN), (proposals, _TAG_PROPOSALS)):
                        if tensor is not None:
                            _posted(dist.isend(tensor, dst=self.next_rank, group=self.send_group, tag=tag)).wait()
                else:
                    self._complete(item[1])
            except BaseException as e:  # noqa: BLE001 - kept for the rank's next send, which raises it
                if not self._closing:
                    self._send_error = e
                return
            self._sends.popleft()

    def reap(self) -> None:
        """Raise if a send failed or has been pending for ``timeout_s``."""
        if self._send_error is not None:
            raise _link_error("sending to", self.next_rank, self._send_error) from self._send_error
        if self._sends and time.monotonic() - self._sends[0] > self.timeout_s:
            raise TransportError(
                f"a send to rank {self.next_rank} has not completed in {self.timeout_s:g} s "
                "(the rank hangs or its link is down)"
            )

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for pending sends; True when all completed."""
        deadline = time.monotonic() + timeout_s
        while self._sends and self._send_error is None and time.monotonic() < deadline:
            time.sleep(0.001)
        return not self._sends

    def shutdown(self, timeout_s: float) -> bool:
        """End both helper threads; True when they ended within ``timeout_s``.

        The next stage is told to stop (even on an error path: that is what ends its
        receive thread), and the receive thread ends when the previous stage does the
        same, or its connection drops. A thread still blocked inside a receive makes
        destroying the process group unsafe (gloo aborts the process), so the caller
        only destroys it when this returns True.
        """
        self._closing = True
        try:
            self.send_stop()
        except TransportError:
            pass  # the next rank is gone already
        self._send_q.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass
        return not any(t.is_alive() for t in self._threads)
