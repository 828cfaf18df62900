"""The simulator's KV-cache events, on vLLM's wire: what its prefix cache stores and evicts.

Owns `KVEventPublisher`, the simulator's copy of vLLM's `ZmqEventPublisher`
(`vllm/distributed/kv_events.py`): a ZeroMQ PUB socket sending each batch as the frames
`[topic, seq (8 bytes, big-endian, from 0), msgpack of the EventBatch]`, the batch encoded
as vLLM's current releases encode it (a map `{"ts", "events", "data_parallel_rank"}`, each
event a map tagged by `"type"`: `BlockStored`, `BlockRemoved`, `AllBlocksCleared`), the
last `buffer_steps` batches kept, and a ROUTER replay socket: a client sends `[b"", start
seq]` and gets every buffered `[b"", seq, payload]` from `start` on, then `[b"", -1, b""]`.

The fault knob `kv_events_drop_rate`: a dropped batch takes its sequence number and stays
in the replay buffer, but is never sent on the PUB socket — a subscriber sees the gap and
can fetch it by replay, as from a real publisher whose message was lost.

What the events say is `simulator.costs.PrefixCache`'s. Does not own the cache or the HTTP
server.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from typing import Any

import msgspec
import zmq
import zmq.asyncio

__all__ = ["KVEventPublisher"]

_END_SEQ = (-1).to_bytes(8, "big", signed=True)


class KVEventPublisher:
    """vLLM's ZMQ KV-event publisher, in the simulator (module docstring)."""

    def __init__(
        self,
        port: int = 0,
        drop_rate: float = 0.0,
        seed: int | None = 0,
        topic: str = "",
        buffer_steps: int = 10_000,
    ) -> None:
        self.port = port
        self.replay_port = port + 1 if port else 0
        self.drop_rate = drop_rate
        self._rng = random.Random(seed)
        self._topic = topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._encode = msgspec.msgpack.Encoder().encode
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._actx: zmq.asyncio.Context | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self.endpoint = ""
        self.replay_endpoint = ""
        self.published = 0
        self.dropped = 0
        self.replays = 0

    def start(self, host: str = "127.0.0.1") -> None:
        """Bind both sockets (port 0: any free one) and serve replays."""
        self._ctx = zmq.Context()
        pub = self._pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 100_000)
        self.port = _bind(pub, host, self.port)
        self._actx = zmq.asyncio.Context()
        router = self._actx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        self.replay_port = _bind(router, host, self.replay_port)
        self.endpoint = f"tcp://{host}:{self.port}"
        self.replay_endpoint = f"tcp://{host}:{self.replay_port}"
        self._task = asyncio.create_task(self._serve_replay(router), name="sim-kv-replay")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._pub is not None:
            self._pub.close(linger=0)
            self._pub = None
        for ctx in (self._ctx, self._actx):
            if ctx is not None:
                ctx.term()
        self._ctx = self._actx = None

    def publish(self, events: list[dict[str, Any]]) -> None:
        """One batch: numbered, buffered, and sent unless the drop fault takes it."""
        seq = self._seq
        self._seq += 1
        payload = self._encode({"ts": time.time(), "events": events, "data_parallel_rank": 0})
        self._buffer.append((seq, payload))
        if self._pub is None:
            return
        if self.drop_rate and self._rng.random() < self.drop_rate:
            self.dropped += 1
            return
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), zmq.NOBLOCK)
            self.published += 1

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        try:
            while True:
                frames = await router.recv_multipart()
                if len(frames) != 3:
                    continue
                client, _, start_b = frames
                start = int.from_bytes(start_b, "big")
                self.replays += 1
                for seq, payload in list(self._buffer):
                    if seq >= start:
                        await router.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
                await router.send_multipart((client, b"", _END_SEQ, b""))
        finally:
            router.close(linger=0)


def _bind(sock: zmq.Socket[Any], host: str, port: int) -> int:
    if port:
        sock.bind(f"tcp://{host}:{port}")
        return port
    bound: int = sock.bind_to_random_port(f"tcp://{host}")
    return bound
