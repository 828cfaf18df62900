"""The wire of vLLM's KV-cache events: decoding a batch, and one subscriber per worker.

vLLM's publisher (`vllm/distributed/kv_events.py`, `ZmqEventPublisher`, turned on by
`--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'`) sends
each `EventBatch` on a ZeroMQ PUB socket as three frames: `[topic, seq, payload]`, `seq`
an 8-byte big-endian counter from 0 per publisher, `payload` msgspec's msgpack of the
batch. It keeps the last `buffer_steps` batches; its ROUTER replay socket, sent an 8-byte
start sequence number (behind an empty delimiter frame, as from a REQ socket), answers
every buffered `[seq, payload]` from there on and then `[-1, b""]`.

Two layouts exist across releases, both decoded here: older ones encode structs as arrays
(`array_like=True`: a batch `[ts, events, dp_rank]`, an event `["BlockStored",
block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name,
extra_keys, group_idx, ...]`), newer ones as maps (`{"ts", "events", ...}`, an event
`{"type": "BlockStored", "block_hashes": ...}`); trailing defaults may be left out.

Owns `decode_batch` and `Subscriber`: SUB to the worker's publisher, sequence tracking,
and recovery — a gap is filled from the replay socket; a gap it cannot fill (no replay
endpoint, the buffer has moved on, no answer in time) clears the worker from the index
(its entries can no longer be trusted; its next events rebuild them); a sequence number
that goes back is a restarted worker (its cache is empty: cleared). The first batch heard
(sequence number above 0) fetches everything buffered before it from the replay socket:
what a SUB socket misses while it joins (ZeroMQ's "slow joiner"), and what workers that ran
before the gateway started already hold. Does not own the index (`kv_index`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from engines.upstream.routing.kv_index import BlockRemoved, BlockStored, Cleared, Event

__all__ = ["EventSource", "Subscriber", "SubscriberStats", "decode_batch"]

log = logging.getLogger("engines.upstream.kv_events")

_END_SEQ = -1
_DECODER = msgspec.msgpack.Decoder()
_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
)
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")


@dataclass(frozen=True, slots=True)
class EventSource:
    """Where one worker publishes: the PUB endpoint, and its replay (ROUTER) endpoint."""

    endpoint: str
    replay: str | None = None
    topic: str = ""


def _fields(ev: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    if isinstance(ev, dict):
        return str(ev.get("type", "")), ev
    if isinstance(ev, list | tuple) and ev:
        return str(ev[0]), dict(zip(names, ev[1:], strict=False))
    return "", {}


def _tuples(extra: Any) -> list[Any] | None:
    if not isinstance(extra, list):
        return None
    return [tuple(e) if isinstance(e, list) else e for e in extra]


def decode_event(ev: Any) -> Event | None:
    tag = ev.get("type") if isinstance(ev, dict) else (ev[0] if ev else None)
    if tag == "BlockStored":
        _, f = _fields(ev, _STORED_FIELDS)
        return BlockStored(
            block_hashes=list(f.get("block_hashes") or ()),
            parent=f.get("parent_block_hash"),
            token_ids=list(f.get("token_ids") or ()),
            block_size=int(f.get("block_size") or 16),
            lora_name=f.get("lora_name"),
            extra_keys=_tuples(f.get("extra_keys")),
            group_idx=f.get("group_idx"),
        )
    if tag == "BlockRemoved":
        _, f = _fields(ev, _REMOVED_FIELDS)
        return BlockRemoved(list(f.get("block_hashes") or ()), f.get("group_idx"))
    if tag == "AllBlocksCleared":
        return Cleared()
    return None  # an event kind this gateway does not know: ignored


def decode_batch(payload: bytes) -> list[Event]:
    """The events of one EventBatch payload, either layout (module docstring)."""
    batch = _DECODER.decode(payload)
    if isinstance(batch, dict):
        raw = batch.get("events") or []
    elif isinstance(batch, list | tuple) and len(batch) >= 2:
        raw = batch[1] or []
    else:
        raise ValueError("not an EventBatch")
    out = []
    for ev in raw:
        e = decode_event(ev)
        if e is not None:
            out.append(e)
    return out


@dataclass(slots=True)
class SubscriberStats:
    batches: int = 0
    gaps: int = 0
    replayed: int = 0
    resyncs: int = 0
    restarts: int = 0
    bad: int = 0


class Subscriber:
    """One worker's event stream into the index: `apply(events)` and `clear()` are the
    index's, bound to the worker's slot."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        source: EventSource,
        apply: Callable[[list[Event]], None],
        clear: Callable[[], None],
        replay_timeout_s: float = 1.0,
    ) -> None:
        self.ctx = ctx
        self.source = source
        self._apply = apply
        self._clear = clear
        self.replay_timeout_s = replay_timeout_s
        self.next_seq: int | None = None
        self.stats = SubscriberStats()
        self._task: asyncio.Task[None] | None = None
        self._sub: zmq.asyncio.Socket | None = None

    def start(self) -> None:
        sub = self._sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.source.topic.encode())
        sub.connect(self.source.endpoint)
        self._task = asyncio.create_task(self._run(sub), name=f"kv-events:{self.source.endpoint}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None

    async def _run(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            try:
                frames = await sub.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as e:  # pragma: no cover - socket closed under us
                log.warning("kv events %s: %s", self.source.endpoint, e)
                return
            if len(frames) != 3 or len(frames[1]) != 8:
                self.stats.bad += 1
                continue
            seq = int.from_bytes(frames[1], "big", signed=True)
            await self._receive(seq, frames[2])

    async def _receive(self, seq: int, payload: bytes) -> None:
        expected = self.next_seq
        if expected is None:
            if seq > 0 and self.source.replay is not None:
                # The first batch heard: what the publisher buffered before it (sent before
                # this socket joined, or before the gateway started) comes from the replay.
                got = [(s, p) for s, p in await self._replay(0) if s < seq]
                for _s, p in got:
                    self._take(p)
                self.stats.replayed += len(got)
        elif seq < expected:
            if expected - seq > 1 or seq == 0:
                # The counter went back: a restarted publisher, whose cache is empty.
                self.stats.restarts += 1
                self._clear()
            else:
                return  # a duplicate (replay and live crossed)
        elif seq > expected:
            self.stats.gaps += 1
            filled = False
            if self.source.replay is not None:
                got = await self._replay(expected)
                missing = [(s, p) for s, p in got if expected <= s < seq]
                if missing and missing[0][0] == expected and len(missing) == seq - expected:
                    for _s, p in missing:
                        self._take(p)
                    self.stats.replayed += len(missing)
                    filled = True
            if not filled:
                # Batches are lost for good: what the index says of this worker may be
                # wrong both ways. Forget it; its next events rebuild it.
                self.stats.resyncs += 1
                self._clear()
        self._take(payload)
        self.next_seq = seq + 1

    def _take(self, payload: bytes) -> None:
        try:
            events = decode_batch(payload)
        except (msgspec.DecodeError, ValueError, TypeError):
            self.stats.bad += 1
            return
        self.stats.batches += 1
        self._apply(events)

    async def _replay(self, start: int) -> list[tuple[int, bytes]]:
        """Buffered batches from `start` on (empty when none came in time)."""
        assert self.source.replay is not None
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        out: list[tuple[int, bytes]] = []
        try:
            sock.connect(self.source.replay)
            await sock.send_multipart([b"", start.to_bytes(8, "big")])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.replay_timeout_s
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return []
                try:
                    frames = await asyncio.wait_for(sock.recv_multipart(), left)
                except TimeoutError:
                    return []
                if len(frames) != 3:
                    continue
                seq = int.from_bytes(frames[1], "big", signed=True)
                if seq == _END_SEQ:
                    return out
                out.append((seq, frames[2]))
        finally:
            with contextlib.suppress(zmq.ZMQError):
                sock.close(linger=0)
