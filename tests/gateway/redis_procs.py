"""Redis as operators run it, for the tests: a throwaway CA with server and client
certificates (openssl), redis-server processes of the test's own (TLS, replicas, extra
settings) and a Sentinel, all on free loopback ports and stopped by the test."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.conftest import free_port


def _server_exe() -> str:
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed (scripts/with-redis installs it)"
    return exe


def _wait(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = check()
            if got:
                return got
        except (redis.RedisError, OSError):
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@dataclass(frozen=True)
class Certs:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate,
    all signed by that CA; `other_ca` signed nothing here (a wrong trust anchor)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    @classmethod
    def make(cls, d: Path) -> Certs:
        d.mkdir(parents=True, exist_ok=True)

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

        key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        for ca in ("ca", "other-ca"):
            run("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days",
                "2", "-subj", f"/CN=gateway test {ca}")  # fmt: skip
        (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
        for name in ("server", "client"):
            run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                f"/CN={name}")  # fmt: skip
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile",
                f"{name}.ext")  # fmt: skip
        return cls(
            d / "ca.crt",
            d / "server.crt",
            d / "server.key",
            d / "client.crt",
            d / "client.key",
            d / "other-ca.crt",
        )


class RedisNode:
    """A redis-server of the test's own on a free loopback port: plain TCP, or TLS only
    (no plaintext port at all, client certificates required) with `certs`."""

    def __init__(self, tmp: Path, *args: str, certs: Certs | None = None):
        self.port = free_port()
        self.certs = certs
        self.dir = tmp / f"redis-{self.port}"
        self.dir.mkdir(parents=True)
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'rediss' if self.certs else 'redis'}://{self.address}/0"

    def start(self) -> RedisNode:
        argv = [_server_exe(), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", ""]
        argv += ["--appendonly", "no", "--protected-mode", "no"]
        if self.certs is None:
            argv += ["--port", str(self.port)]
        else:
            c = self.certs
            argv += ["--port", "0", "--tls-port", str(self.port)]
            argv += ["--tls-cert-file", str(c.server_cert), "--tls-key-file", str(c.server_key)]
            argv += ["--tls-ca-cert-file", str(c.ca), "--tls-auth-clients", "yes"]
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen([*argv, *self.args], stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def up() -> bool:
            # A build without TLS exits at once: say why rather than time out.
            assert self.proc is not None and self.proc.poll() is None, (
                self.dir / "redis.log"
            ).read_text()[-1500:]
            return bool(self.client().ping())

        _wait(f"redis-server on {self.port}", up)
        return self

    def client(self, **kw: Any) -> redis.Redis:
        """A superuser client (the default user) to set the server up and look inside."""
        tls: dict[str, Any] = {}
        if self.certs is not None:
            c = self.certs
            tls = {"ssl": True, "ssl_ca_certs": str(c.ca), "ssl_certfile": str(c.client_cert),
                   "ssl_keyfile": str(c.client_key)}  # fmt: skip
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5, **tls, **kw)

    def role(self) -> str:
        with self.client() as r:
            return str(r.execute_command("ROLE")[0])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class SentinelNode:
    """`redis-server --sentinel` watching one primary as the service `master`."""

    def __init__(
        self, tmp: Path, primary: RedisNode, master: str = "mymaster", certs: Certs | None = None
    ):
        self.port = free_port()
        self.master = master
        self.certs = certs
        self.dir = tmp / f"sentinel-{self.port}"
        self.dir.mkdir(parents=True)
        self.conf = self.dir / "sentinel.conf"
        # Sentinel rewrites its own file: it must be writable. A manual failover does
        # not wait for down-after; failover-timeout bounds a stuck one.
        listen = f"port {self.port}\n"
        if certs is not None:  # TLS only, to clients and to the data nodes alike
            listen = (
                f"port 0\ntls-port {self.port}\ntls-replication yes\n"
                f"tls-cert-file {certs.server_cert}\ntls-key-file {certs.server_key}\n"
                f"tls-ca-cert-file {certs.ca}\n"
                # Towards the data nodes the sentinel is their client: the same cert.
                f"tls-client-cert-file {certs.client_cert}\n"
                f"tls-client-key-file {certs.client_key}\n"
            )
        self.conf.write_text(
            f"{listen}bind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {master} 127.0.0.1 {primary.port} 1\n"
            f"sentinel down-after-milliseconds {master} 2000\n"
            f"sentinel failover-timeout {master} 10000\n"
            f"sentinel parallel-syncs {master} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> SentinelNode:
        log = (self.dir / "sentinel.log").open("ab")
        self.proc = subprocess.Popen(
            [_server_exe(), str(self.conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        _wait(f"sentinel on {self.port}", lambda: self.client().ping())
        return self

    def client(self) -> redis.Redis:
        tls: dict[str, Any] = {}
        if self.certs is not None:
            c = self.certs
            tls = {"ssl": True, "ssl_ca_certs": str(c.ca), "ssl_certfile": str(c.client_cert),
                   "ssl_keyfile": str(c.client_key)}  # fmt: skip
        return redis.Redis(port=self.port, decode_responses=True, socket_timeout=5, **tls)

    def primary_port(self) -> int:
        with self.client() as r:
            _, port = r.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
            return int(port)

    def replicas_seen(self) -> int:
        with self.client() as r:
            replicas = r.execute_command("SENTINEL", "REPLICAS", self.master)
        return len(replicas)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def wait_for(what: str, check: Any, timeout: float = 30.0) -> Any:
    """Poll `check` until it returns something true (a Redis error counts as not yet)."""
    return _wait(what, check, timeout)
