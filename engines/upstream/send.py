"""The send path of the upstream engine: one attempt after another on the picked workers,
until one answers or the request may not be retried.

Owns `Sender` (mixed into `engines.upstream.engine.OpenAIEngine`): picking an endpoint,
building nothing (the engine hands over the request bytes), one attempt (`_attempt`:
connect, status, a stream's first bytes under `first_byte_timeout_s`), classifying what
went wrong (retriable before the first byte reaches the client: connect errors, resets,
first-byte timeouts, 502/503/504 that are not backpressure), the retry budget and
counting failures and successes toward outlier ejection (`engines.upstream.outliers`), the
fast-fail 503 with Retry-After when no worker passes the filters, on-demand adapter
placement before an attempt, panic routing (`options.panic_threshold`: ejected workers
are picked too when too many are ejected), and turning an error answer into a
ServingError (the worker's Retry-After kept; URLs and bodies only in the log). Does not
own relaying the answer (the engine) or routing decisions (`engines.upstream.routing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engines.base import (
    EngineOverloaded,
    EngineTimeout,
    EngineUnavailable,
    GenerateRequest,
    ServingError,
    UpstreamError,
)
from engines.upstream import http1
from engines.upstream.endpoints import Endpoint
from engines.upstream.errors import is_backpressure, is_json_error
from engines.upstream.routing import RoutingRequest

if TYPE_CHECKING:
    import aiohttp

    from engines.spec import ModelSpec
    from engines.upstream.adapters import AdapterFanout
    from engines.upstream.options import UpstreamOptions
    from engines.upstream.outliers import Outliers, RetryBudget
    from engines.upstream.routing import Router

__all__ = ["Sender"]

log = logging.getLogger("engines.upstream")


class _Retriable(Exception):
    """An attempt failed in a way another worker may serve (nothing reached the client)."""

    def __init__(self, error: ServingError) -> None:
        super().__init__(error.message)
        self.error = error


class Sender:
    """The send path; the engine provides the state below."""

    spec: ModelSpec
    opts: UpstreamOptions
    router: Router
    budget: RetryBudget
    outliers: Outliers
    adapter_state: AdapterFanout
    _session: aiohttp.ClientSession | None
    _endpoints: list[Endpoint]
    _forward_id: bool
    _on_demand: bool
    # Requests answered 503 at once because no worker passed the filters.
    fast_fails: int = 0
    # Attempts routed in panic mode (`options.panic_threshold`): ejected workers included.
    panic_routes: int = 0

    def normalise_error(self, status: int, body: bytes) -> ServingError:
        raise NotImplementedError

    def _pick(
        self, req: RoutingRequest | None, exclude: Sequence[Endpoint] = ()
    ) -> Endpoint | None:
        """The endpoint for one attempt (`engines.upstream.routing`); in panic mode
        (at least `options.panic_threshold` of the healthy workers out; by default all of
        them) over the ejected and busy half-open workers too."""
        threshold = self.opts.panic_threshold
        if threshold is None:
            return self.router.pick(self._endpoints, req, exclude)
        # Below 1 the share is checked first (the filters would leave some, but too few);
        # at 1 only when the filters left none (no cost on the common path).
        if threshold < 1.0 and self._panicking(threshold):
            ep = None
        else:
            ep = self.router.pick(self._endpoints, req, exclude)
            if ep is not None or not self._panicking(threshold):
                return ep
        ep = self.router.pick_panic(self._endpoints, req, exclude)
        if ep is not None:
            self.panic_routes += 1
        return ep

    def _panicking(self, threshold: float) -> bool:
        """At least `threshold` of the healthy workers are out: ejected, or half-open
        with its one request in flight."""
        healthy = out = 0
        for e in self._endpoints:
            if e.healthy:
                healthy += 1
                out += e.ejected or (e.half_open and e.outstanding > 0)
        return out > 0 and out >= threshold * healthy

    def _no_worker(self) -> EngineUnavailable:
        """The fast-fail 503 when no worker passes the filters; Retry-After is the time
        until the next health probe or the end of the soonest ejection."""
        if self._session is None:
            return EngineUnavailable(f"model {self.spec.name!r} is not started")
        self.fast_fails += 1
        now = asyncio.get_running_loop().time()
        wait = self.opts.health_interval_s
        for ep in self._endpoints:
            if ep.ejected and ep.healthy:
                wait = min(wait, max(0.0, ep.ejected_until - now) + self.opts.health_interval_s)
        err = EngineUnavailable(
            f"The model `{self.spec.name}` has no worker that can take the request now; "
            "try again shortly.",
            retry_after=max(1.0, wait),
        )
        err.public = True  # names only the model; counted in `fast_fails`, not logged
        return err

    def _unreachable(self) -> EngineUnavailable:
        return EngineUnavailable(f"model {self.spec.name!r}: no worker reachable")

    def _failed(self, ep: Endpoint, why: str) -> None:
        """One failure of `ep` toward outlier ejection."""
        self.outliers.failure(ep, why, asyncio.get_running_loop().time())

    async def _send(
        self,
        route: str,
        data: bytes,
        request_id: str,
        stream: bool,
        rreq: RoutingRequest | None = None,
        trace: GenerateRequest | None = None,
        tried: list[Endpoint] | None = None,
    ) -> tuple[Endpoint, Any, bytes]:
        """POST to a picked endpoint; before the first byte reaches the client, retry a
        retriable failure (`_attempt`) on another endpoint, at most `max_retries` times and
        within the retry budget. Returns the endpoint, with its outstanding count raised
        (the caller lowers it), the `http1.Stream` (stream) or whole `http1.Response`, and
        for a stream its first body bytes. `tried` (a continuation,
        `engines.upstream.continuation`): the workers this request already used, which
        count toward `max_retries`; it is not counted as a new request. A traced request
        (`trace.trace`) notes each attempt, its worker and routing reason, and sends its
        `traceparent`; untraced, that costs one attribute check per attempt."""
        budget = self.budget
        continuation = tried is not None
        if tried is None:
            budget.requests += 1
            ep = self._pick(rreq)
            tried = []
        else:
            ep = self._pick(rreq, tried)
        if ep is None:
            raise self._no_worker()
        tc = trace.trace if trace is not None else None
        if tc is not None:
            reason = self.router.last  # now: another request may pick while this one awaits
            if continuation:
                tc.failed("the worker failed mid-stream")
        rid = (
            request_id.encode()
            if self._forward_id and request_id.isascii() and request_id.isprintable()
            else None
        )
        relearned: list[Endpoint] = []
        while True:
            pool = ep.pool
            if pool is None:
                raise EngineUnavailable(f"model {self.spec.name!r} is not started")
            head: bytes = getattr(ep, route)
            if tc is not None:
                head += b"traceparent: %s\r\n" % tc.attempt(ep.url, reason, continuation)
            if rid is None:
                req = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(data), data)
            else:
                req = b"%sX-Request-Id: %s\r\nContent-Length: %d\r\n\r\n%s" % (
                    head,
                    rid,
                    len(data),
                    data,
                )
            placed = self._on_demand and rreq is not None and rreq.adapter is not None
            if placed:
                assert rreq is not None and rreq.adapter is not None
                await self.adapter_state.ensure(self._session, ep, rreq.adapter)
            try:
                resp, first = await self._attempt(ep, pool, req, stream, request_id)
            except ServingError as e:
                # On-demand placement with several front doors: another one may have
                # evicted the adapter from this worker since this one placed it. The
                # worker's 404 means this view is stale: forget it and place it again,
                # once per worker (nothing reached the client).
                if tc is not None:
                    tc.failed(e.message)
                if not (placed and e.status == 404) or ep in relearned:
                    raise
                assert rreq is not None and rreq.adapter is not None
                relearned.append(ep)
                ep.adapters.pop(rreq.adapter, None)
                continue
            except _Retriable as r:
                tried.append(ep)
                if trace is not None:
                    trace.retries = len(tried)
                if tc is not None:
                    tc.failed(r.error.message)
                other = None
                if len(tried) <= self.opts.max_retries:
                    other = self._pick(rreq, tried)
                    if tc is not None:
                        reason = self.router.last
                if other is None or not budget.try_retry():
                    raise r.error from r.__cause__
                ep = other
                continue
            if trace is not None:
                trace.worker = ep.url
            return ep, resp, first

    async def _attempt(
        self, ep: Endpoint, pool: http1.Pool, req: bytes, stream: bool, rid: str
    ) -> tuple[Any, bytes]:
        """One attempt on one endpoint. Raises `_Retriable` for what may go to another
        worker (nothing reached the client): connect errors and timeouts, a connection
        closed or reset before the answer, a stream's first-byte timeout, 502/503/504
        that are not backpressure. Counts failures toward ejection (never a 429 or a
        queue-full 503) and successes that end a failure streak."""
        ep.outstanding += 1
        resp: Any = None
        sresp: http1.Stream | None = None
        try:
            if stream:
                # The first-byte timeout is the connection's (`http1.FirstByteTimeout`):
                # an `asyncio.timeout` here was a Timeout object, a timer and a
                # current_task() per stream, 1.5 % of py-spy's samples relaying short
                # streams at concurrency 256.
                resp = sresp = await pool.stream(req, self.opts.first_byte_timeout_s)
                if resp.status != 200:
                    body = await resp.read()
                    raise self._status_error(
                        ep, resp.status, body, resp.header(b"retry-after"), rid
                    )
                first = await resp.read_chunk()
            else:
                resp = await pool.fetch(req)
                if resp.status != 200:
                    raise self._status_error(
                        ep, resp.status, resp.body, resp.header(b"retry-after"), rid
                    )
                first = b""
        except _Retriable:
            ep.outstanding -= 1
            if sresp is not None:
                sresp.release()
            raise
        except ServingError:
            ep.outstanding -= 1
            if sresp is not None:
                sresp.release()
            raise
        except http1.ConnectError as e:
            ep.outstanding -= 1
            ep.healthy, ep.detail = False, f"connection failed: {e}"
            self._failed(ep, f"connection failed: {e}")
            log.warning("request %s: upstream %s unreachable: %s", rid, ep.url, e)
            raise _Retriable(self._unreachable()) from e
        except http1.Disconnected as e:
            ep.outstanding -= 1
            self._failed(ep, f"connection reset: {e}")
            log.warning("request %s: upstream %s reset the connection: %s", rid, ep.url, e)
            raise _Retriable(self._unreachable()) from e
        except TimeoutError as e:
            ep.outstanding -= 1
            if sresp is not None:
                sresp.close()
            what = "connecting" if isinstance(e, http1.ConnectTimeout) else "first byte"
            if not stream and not isinstance(e, http1.ConnectTimeout):
                self._failed(ep, f"no answer in {self.opts.read_timeout_s:g} s")
                log.warning("request %s: upstream %s did not answer in time", rid, ep.url)
                raise EngineTimeout(
                    f"model {self.spec.name!r}: a worker did not answer in time"
                ) from e
            self._failed(ep, f"{what} timeout")
            log.warning("request %s: upstream %s %s timeout", rid, ep.url, what)
            raise _Retriable(
                EngineTimeout(f"model {self.spec.name!r}: a worker did not answer in time")
            ) from e
        except http1.ProtocolError as e:
            ep.outstanding -= 1
            if sresp is not None:
                sresp.close()
            self._failed(ep, f"broken answer: {e}")
            log.warning("request %s: upstream %s failed mid-response: %s", rid, ep.url, e)
            err = UpstreamError(f"model {self.spec.name!r}: a worker failed mid-response")
            if stream:  # before the first body byte: nothing reached the client
                raise _Retriable(err) from e
            raise err from e
        except BaseException:
            ep.outstanding -= 1
            if sresp is not None:
                sresp.close()
            raise
        self.outliers.success(ep)
        return resp, first

    def _status_error(
        self, ep: Endpoint, status: int, body: bytes, retry_after: bytes | None, rid: str
    ) -> BaseException:
        """An error answer: the ServingError to raise (wrapped in `_Retriable` for a
        502/503/504 that is not backpressure), counted toward ejection when it is a
        failure of the worker."""
        err = self._answer_error(status, body, retry_after, rid, ep)
        if status == 429 or is_backpressure(status, err):
            return err
        if status >= 500:
            self._failed(ep, f"answered {status}: {err.message[:200]}")
            if status in (502, 503, 504):
                return _Retriable(err)
        else:
            self.outliers.success(ep)  # a client error: the worker itself works
        return err

    def _answer_error(
        self, status: int, body: bytes, retry_after: bytes | None, request_id: str, ep: Endpoint
    ) -> ServingError:
        json_error = is_json_error(body)
        if status >= 500 or not json_error:
            # What the worker said stays in the log, with the request id; the client gets
            # the normalised error (a generic text for a body that is not a JSON error).
            log.warning(
                "request %s: upstream %s answered HTTP %d: %s",
                request_id,
                ep.url,
                status,
                body[:4000].decode("utf-8", "replace"),
            )
        err = self.normalise_error(status, body)
        if not json_error:
            err.message = (
                f"The model `{self.spec.name}` answered HTTP {status} without an error message."
            )
            err.args = (err.message,)
        if isinstance(err, (EngineOverloaded, EngineUnavailable)) and retry_after is not None:
            with contextlib.suppress(ValueError):
                err.retry_after = float(retry_after)
        return err
