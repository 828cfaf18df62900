"""`gateway serve --workers N`: N front-door processes on one listening socket, and one
control process that owns the engines which launch processes or load models.

Layout of one multi-process gateway (the process that runs `gateway serve` is the parent):

    parent ── control child  `gateway serve` on 127.0.0.1:<free port>, one process, serving
       │                     every model whose engine launches or loads something
       │                     (transformers, vllm, lmdeploy, sim); it starts, supervises and
       │                     stops them exactly as a one-process gateway does
       └─ uvicorn's supervisor ── N front doors, each listening on its own SO_REUSEPORT
                                  socket beside the one the supervisor bound to hold the
                                  port (the kernel spreads connections by a hash; see
                                  `gateway.server_limits.reuse_port_socket`);
                                  each front door serves the same catalog, rewritten so that
                                  in-process models (transformers, sim) are `engine: openai`
                                  endpoints on the control's loopback port, launched workers
                                  (vllm, lmdeploy) are attached by URL, and attach-mode
                                  models go straight to their workers

Launched workers are reached directly, not through the control process: the control
launches and supervises them on ports the parent fixes in advance (`options.base_port`),
and every front door attaches to those URLs with the model's own engine (its response
rewrites, routing, retries and continuation), so streams cost one relay hop and the
control process is off the data path. A worker the control restarts comes back on the
same port, which the front doors' health probes notice. The two catalogs are written by
`gateway.front_catalog`.

Front doors share keys, limits, usage and adapter desired state through the state store
when `GATEWAY_REDIS_URL` is set. Without Redis each front door has its own in-memory
limiter deciding at limit ÷ N, its own usage ledger, and serves only the adapters loaded
through itself: use Redis with N > 1 when adapters are loaded at run time. The control
process trusts only a random per-run token (its only client and admin key), passed to
front doors in the environment.

The control process is watched by a thread of the parent: when it dies it is started again
on the same port with the same token, after a backoff (`RESTART_FIRST_S` doubling to
`RESTART_MAX_S`, reset once it has run `STABLE_S`), with one progress line per step on
stderr; meanwhile front doors answer its models with 503 + Retry-After (their relay finds
no healthy endpoint). It is started again with the adapter desired state of the store
(Redis: every adapter loaded through any front door) written into its catalog's
`lora.adapters`, so it holds them before it reports healthy.

The admin port (`GATEWAY_ADMIN_PORT`) is bound once by the parent, like the public socket,
and inherited by every front door: an admin request is served by whichever front door
accepts it (keys and adapter state are shared through the store, so any one will do); the
control process never binds it.

Stopping: Ctrl-C, SIGTERM or SIGHUP (a closed terminal) to the parent makes every front
door do what one process does (`gateway.drain`: readiness 503 at once,
`GATEWAY_DRAIN_ACCEPT_S` of accepting, then in-flight requests get
`GATEWAY_DRAIN_SECONDS`), all at the same time; one still there `FRONT_DOOR_MARGIN_S`
after that is killed, with a progress line on stderr every `PROGRESS_S` while it is
waited for. Once all have exited, the control process is stopped (SIGTERM, its engines
stopped, then SIGKILL after `STOP_TIMEOUT_S`). uvicorn's supervisor
also restarts a front door that dies.

A stop restarts nothing, whoever gets the signal. Ctrl-C signals the whole process group:
the control process runs in a session of its own (as launched workers do,
`engines.launch.supervisor`), so it is stopped by the parent after the front doors have
drained (their in-flight requests may need it), never by the terminal; it dies with the
parent (`gateway.control_process`), so a SIGKILL to the group leaves it behind neither. From the
parent's first stop signal on, neither the control process nor a front door is started
again, and a control process that exits as told (status 0, SIGINT, SIGTERM) gets
`STOP_GRACE_S` for the parent's own signal to arrive before it counts as a crash (a signal
sent to every process at once, as systemd's stop does).

Not here: what a front door does with a request (`gateway.app`), engines' supervision of
their own workers (`engines.launch`).

Why one module of this size: the parent's start, supervision and stop of the control
process and the front doors share one stop state (no restart once a stop began, the drain
budget); the control process's own entry and the catalog split already live apart
(`gateway.control_process`, `gateway.front_catalog`).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from gateway.front_catalog import CONTROL_KEY_ENV, free_port, split_catalog
from gateway.settings import Settings

STOP_TIMEOUT_S = 60.0
# A front door gets its accept window and drain on SIGTERM, then this much more before
# SIGKILL (uvicorn's supervisor would wait for it forever).
FRONT_DOOR_MARGIN_S = 15.0
# How often a stop that is still waiting says so on stderr.
PROGRESS_S = 5.0
# How long the control process may take to start its engines (vLLM loads take minutes).
START_TIMEOUT_S = 3600.0
# A dead control process is started again after this, doubling up to RESTART_MAX_S; the
# delay starts over once it has served STABLE_S.
RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
STABLE_S = 60.0
STOP_GRACE_S = 1.0
# How a control process that was told to stop exits: status 0, or killed by SIGINT/SIGTERM.
_STOP_CODES = (0, -signal.SIGINT, -signal.SIGTERM)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _wait_healthy(
    url: str, proc: subprocess.Popen[bytes], timeout: float, stop: threading.Event | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the control process exited with status {proc.returncode}")
        if stop is not None and stop.is_set():
            raise RuntimeError("stopping")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"the control process was not healthy after {timeout:.0f} s")
        if now - last > 15:
            _say(f"waiting for the control process at {url} ...")
            last = now
        time.sleep(0.25)


class Control:
    """The control process: started, watched and restarted by a thread of the parent."""

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        url: str,
        settings: Settings,
        catalog: Path,
        doc: dict[str, Any],
    ):
        self.argv, self.env, self.url, self.settings = argv, env, url, settings
        self.catalog, self.doc = catalog, doc
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        # Set from the parent's signal handler (no lock there): the gateway is stopping.
        self.halted = False
        self.restarts = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start it and wait until it serves (the first start: failures are fatal)."""
        self.proc = self._spawn()
        _wait_healthy(self.url, self.proc, START_TIMEOUT_S)
        self._thread = threading.Thread(target=self._watch, name="control-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        delay = RESTART_FIRST_S
        while not self.stopping.is_set():
            proc = self.proc
            assert proc is not None
            began = time.monotonic()
            code = proc.wait()
            if code in _STOP_CODES and not self.halted:
                self.stopping.wait(STOP_GRACE_S)
            if self.stopping.is_set() or self.halted:
                return
            if time.monotonic() - began > STABLE_S:
                delay = RESTART_FIRST_S
            self.restarts += 1
            _say(
                f"the control process exited with status {code}; its models answer 503 "
                f"until it is back; restarting it in {delay:g} s (restart {self.restarts})"
            )
            if self.stopping.wait(delay):
                return
            delay = min(delay * 2, RESTART_MAX_S)
            self._write_catalog()
            with self._lock:
                if self.stopping.is_set() or self.halted:
                    return
                self.proc = self._spawn()
            try:
                _wait_healthy(self.url, self.proc, START_TIMEOUT_S, self.stopping)
            except (RuntimeError, TimeoutError) as e:
                _say(f"the control process did not come back: {e}")
                if self.proc.poll() is None and not self.stopping.is_set():
                    self.proc.kill()
                continue
            _say(f"the control process is back on {self.url} (restart {self.restarts})")

    def _spawn(self) -> subprocess.Popen[bytes]:
        # A session of its own: a signal to the gateway's process group does not reach it.
        return subprocess.Popen(self.argv, env=self.env, start_new_session=True)

    def halt(self) -> None:
        """The gateway is stopping: restart nothing from now on (signal-handler safe)."""
        self.halted = True

    def _desired(self) -> dict[str, dict[str, str]]:
        """The adapter desired state in the store: name → {"base", "path"}."""
        if not self.settings.redis_url:
            return {}  # no shared state: the front door that loaded one re-applies it
        import redis

        from gateway.adapter_sync import MAP
        from gateway.state_store.target import RedisTarget

        try:
            # TLS, ACL user and Sentinel as the front doors reach it.
            r = RedisTarget.from_settings(self.settings).sync_client(socket_timeout=5)
            try:
                raw = r.hgetall(f"{self.settings.redis_prefix}:map:{MAP}")
            finally:
                r.close()
        except redis.RedisError as e:
            _say(f"adapters not re-applied to the control process: {e}")
            return {}
        return {str(name): dict(yaml.safe_load(v)) for name, v in raw.items()}

    def _write_catalog(self) -> None:
        """The control's catalog with the desired adapters listed under their base models'
        `lora.adapters`, so it serves them before it reports healthy (no window in which
        a front door reaches it for an adapter it does not hold yet)."""
        desired = self._desired()
        models = []
        for entry in self.doc.get("models") or []:
            entry = dict(entry)
            lora = dict(entry.get("lora") or {})
            listed = list(lora.get("adapters") or [])
            names = {a["name"] for a in listed}
            room = int(lora.get("max_adapters", 4)) - len(listed)
            for name, d in desired.items():
                if d.get("base") == entry.get("name") and name not in names and room > 0:
                    listed.append({"name": name, "path": d["path"]})
                    room -= 1
                    _say(f"adapter {name!r} re-applied to the control process at its start")
            if lora:
                lora["adapters"] = listed
                entry["lora"] = lora
            models.append(entry)
        self.catalog.write_text(yaml.safe_dump({**self.doc, "models": models}))

    def stop(self) -> None:
        with self._lock:
            self.stopping.set()
        _stop(self.proc)


def _wait_saying(gone: Callable[[float], bool], deadline: float, waiting: str) -> bool:
    """Wait until `gone(timeout)` says the process has exited, with `waiting` on stderr
    every PROGRESS_S; False if it is still there at `deadline` (monotonic)."""
    while True:
        if gone(min(PROGRESS_S, max(0.0, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= deadline:
            return False
        _say(waiting)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)

    def gone(timeout: float) -> bool:
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    deadline = time.monotonic() + STOP_TIMEOUT_S
    waiting = f"waiting for the control process [{proc.pid}] to stop its engines ..."
    if not _wait_saying(gone, deadline, waiting):
        _say(f"the control process [{proc.pid}] did not stop in {STOP_TIMEOUT_S:g} s; killing it")
        proc.kill()
        proc.wait()


def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class _FrontDoor(Process):
    """uvicorn's worker process, serving with the draining server (`gateway.drain`) and
    the connection guard of a one-process gateway (`gateway.server_limits`: header and
    body deadlines, connection caps — each front door counts its own connections)."""

    settings: Settings | None = None
    reuse_port = False

    def target(self, sockets: list[socket.socket] | None = None) -> None:
        # In the child.
        if self.settings is not None:
            from gateway.server_limits import guarded_protocol

            self.config.http = guarded_protocol(self.settings)
        # With reuse_port, listen on a socket of our own beside the parent's (which only
        # holds the port) instead of on the inherited one.
        if self.reuse_port and sockets:
            from gateway.server_limits import reuse_port_socket

            held = sockets[0]
            sockets = [reuse_port_socket(held), *sockets[1:]]
            held.close()
        super().target(sockets)

    @property
    def server(self) -> Any:
        if self._server is None:
            from gateway.drain import DrainingServer

            accept_s = self.settings.drain_accept_s if self.settings is not None else 5.0
            self._server = DrainingServer(self.config, None, accept_s)
        return self._server


class _FrontDoors(Multiprocess):
    """uvicorn's supervisor of N front doors, each a `_FrontDoor`."""

    def __init__(
        self,
        config: Any,
        sockets: list[socket.socket],
        settings: Settings,
        reuse_port: bool,
        on_stop: Callable[[], None],
    ):
        super().__init__(config, sockets)  # installs the supervisor's signal handlers
        self.settings = settings
        self.accept_s = settings.drain_accept_s
        self.reuse_port = reuse_port
        self.on_stop = on_stop
        self.halted = False
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._stop_signal)

    def _stop_signal(self, sig: int, frame: Any) -> None:
        # At once, not at the supervisor's next look at its queue (every 0.5 s): a front
        # door or the control process that the same signal stopped is not restarted.
        self.halted = True
        self.on_stop()
        # SIGHUP stops too (a closed terminal hangs up the whole group; the front doors
        # drain on it, `gateway.drain`): uvicorn's supervisor would restart every process.
        self.signal_queue.append(signal.SIGTERM if sig == signal.SIGHUP else sig)

    def _new(self) -> Process:
        p = _FrontDoor(self.config, self.sockets)
        p.settings = self.settings
        p.reuse_port = self.reuse_port
        return p

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            process = self._new()
            process.start()
            self.processes.append(process)

    def join_all(self) -> None:
        # uvicorn's waits for each front door forever: one stuck in its shutdown would keep
        # the whole gateway (and its control process) up. Each gets its accept window and
        # drain, then FRONT_DOOR_MARGIN_S, and is killed after that; a line every
        # PROGRESS_S says who is still being waited for.
        budget = self.accept_s + float(self.config.timeout_graceful_shutdown or 0)
        deadline = time.monotonic() + budget + FRONT_DOOR_MARGIN_S
        for door in self.processes:

            def gone(timeout: float, door: Process = door) -> bool:
                door.process.join(timeout)
                return door.exitcode is not None

            waiting = f"waiting for front door [{door.pid}] to finish its requests ..."
            if door.exitcode is None and not _wait_saying(gone, deadline, waiting):
                _say(f"front door [{door.pid}] did not stop in time; killing it")
                door.process.kill()
                door.process.join()

    def keep_subprocess_alive(self) -> None:
        # uvicorn's, with our process class, and nothing restarted once a stop began.
        if self.should_exit.is_set() or self.halted:
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            if self.should_exit.is_set() or self.halted:
                # A stop began while it was being asked (a look takes up to the health
                # check's timeout): `join_all` waits for it and kills it if it must, saying so.
                return
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:  # it would fail the same way again
                _say(f"front door [{process.pid}] failed to start; stopping")
                self.should_exit.set()
                return
            if self.should_exit.is_set() or self.halted:
                return
            _say(f"front door [{process.pid}] died; starting another")
            process = self._new()
            process.start()
            self.processes[idx] = process


def serve_workers(settings: Settings) -> int:
    """Run the control process (if any model needs one) and N front doors until stopped."""
    from gateway.server_limits import listen_sockets, uvicorn_config

    config = settings.config.resolve()
    raw = yaml.safe_load(config.read_text()) or {}
    token = secrets.token_urlsafe(24)
    control_port = free_port("127.0.0.1")
    control_url = f"http://127.0.0.1:{control_port}"
    control_models, front_models = split_catalog(raw, control_url)
    # Next to the original, so relative paths inside (models, adapter roots) still resolve.
    tag = f"{os.getpid()}"
    control_cfg = config.with_name(f".{config.stem}.control-{tag}.yaml")
    front_cfg = config.with_name(f".{config.stem}.front-{tag}.yaml")
    control: Control | None = None
    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        if control_models:
            control_cfg.write_text(yaml.safe_dump({**raw, "models": control_models}))
            drop = ("GATEWAY_KEYS_FILE", "GATEWAY_ADMIN_PORT", "GATEWAY_ADMIN_HOST")
            env = {k: v for k, v in os.environ.items() if k not in drop}
            env |= {
                "GATEWAY_CONFIG": str(control_cfg),
                "GATEWAY_WORKERS": "1",
                "GATEWAY_API_KEYS": token,
                "GATEWAY_ADMIN_KEY": token,
                "GATEWAY_REDIS_URL": "",
                # Every front door's relay connections come from 127.0.0.1: the
                # per-address cap meant for clients would refuse them under load.
                "GATEWAY_MAX_CONNECTIONS_PER_CLIENT": "1000000",
                # The front doors hold the accept window; the control stops when they are gone.
                "GATEWAY_DRAIN_ACCEPT_S": "0",
            }
            n = len(control_models)
            _say(f"starting the control process for {n} model(s) on {control_url}")
            argv = [
                *(sys.executable, "-m", "gateway.control_process", "serve", "--workers", "1"),
                *("--host", "127.0.0.1", "--port", str(control_port)),
            ]
            doc = {**raw, "models": control_models}
            control = Control(argv, env, control_url, settings, control_cfg, doc)
            control.start()
        front_cfg.write_text(yaml.safe_dump({**raw, "models": front_models}))
        os.environ.update(
            {
                "GATEWAY_CONFIG": str(front_cfg),
                "GATEWAY_WORKERS": str(settings.workers),
                CONTROL_KEY_ENV: token,
            }
        )
        signal.signal(signal.SIGTERM, previous)
        admin = ""
        if settings.admin_port:
            admin = f", admin on {settings.admin_host}:{settings.admin_port}"
        _say(f"starting {settings.workers} front doors on {settings.host}:{settings.port}{admin}")
        # The one-process server's config (keep-alive timeout and all); its guarded
        # protocol class is made per server and cannot travel to a spawned process, so
        # each front door makes its own (`_FrontDoor.target`).
        uv = uvicorn_config(
            "gateway.app:app_from_env",
            settings,
            factory=True,
            workers=settings.workers,
            http="httptools",
            timeout_graceful_shutdown=settings.drain_seconds,
        )
        reuse = settings.reuse_port and hasattr(socket, "SO_REUSEPORT")
        sockets = listen_sockets(uv, settings, reuse_port=reuse)
        halt = control.halt if control is not None else (lambda: None)
        _FrontDoors(uv, sockets, settings, reuse, halt).run()
        return 0
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if control is not None:
            control.stop()
        for path in (control_cfg, front_cfg):
            path.unlink(missing_ok=True)
