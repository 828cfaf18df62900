"""What a launch is made of: the launch options, one worker's command, and the pieces every
launched engine shares when it builds one.

Owns `LaunchOptions` (the `options:` of launched engines) and their cross-field checks,
`WorkerCommand` (argv, extra environment, port, label), free ports, GPU assignment,
`engine_args` → flags, the checkpoint's own quantization method, and the paths a launch
resolves. Does not know any engine's flags (`engines.launch.vllm`, `engines.launch.lmdeploy`
build the argv) and runs nothing (`engines.launch.supervisor`).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from engines.spec import ModelSpec, SpecIssue
from engines.upstream.options import UpstreamOptions

__all__ = [
    "DEFAULT_BASE_PORT",
    "LaunchOptions",
    "ResolvedPaths",
    "WorkerCommand",
    "adapter_paths",
    "flag_args",
    "free_port",
    "gpu_assignment",
    "launch_issues",
    "memory_share",
    "replicas_per_gpu",
]

# Where `launch_commands` puts worker ports when `options.base_port` is not given. The
# listing must be the same on every run (`gateway check` prints it); a real launch without
# an explicit base_port picks free ports instead (see `LaunchOptions.base_port`).
DEFAULT_BASE_PORT = 8100


class LaunchOptions(UpstreamOptions):
    """The `options:` keys every launched engine (vllm, lmdeploy) understands, on top of
    the relay's (`UpstreamOptions`). Engines subclass this to add their own; unknown keys
    are refused (a typo must not be a no-op)."""

    # Keys of a subclass that mean nothing in attach mode (the base's keys never do).
    launch_only: ClassVar[frozenset[str]] = frozenset()

    # First worker port; replica i listens on base_port + i. Given: used as is at launch
    # (fixed ports, e.g. for a firewall). Not given: `launch_commands` shows 8100 + i and a
    # real launch binds free ports.
    base_port: int | None = Field(default=None, ge=1024, le=65535)
    # How long one worker may take from launch to `GET /health` → 200. vLLM takes 2 min on
    # an H200 with torch.compile and CUDA graphs for a small model; big models take longer.
    # (The relay then waits the same time for a first healthy worker.)
    start_timeout_s: float = Field(default=900.0, gt=0)
    # Seconds a worker gets on stop to finish its running requests: vLLM is told so with
    # `--shutdown-timeout` (its default, 0, aborts them at once); the supervisor sends
    # SIGTERM and waits this plus `stop_margin_s` (the engine's own teardown: engine-core
    # processes, CUDA) before SIGKILL.
    stop_grace_s: float = Field(default=30.0, ge=0)
    stop_margin_s: float = Field(default=10.0, ge=0)
    # Restart backoff: first delay, doubled per consecutive crash up to the cap.
    restart_backoff_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=60.0, gt=0)
    # The program to run instead of the engine's own CLI name (`vllm`, `lmdeploy`), e.g.
    # ["/opt/vllm-venv/bin/vllm"] or ["python3", "-m", "vllm.entrypoints.cli.main"]. The
    # engine's subcommand and flags follow it unchanged.
    command: list[str] | None = Field(default=None, min_length=1)
    # Extra environment for every worker (e.g. VLLM_USE_FLASHINFER_SAMPLER: "0").
    env: dict[str, str] = Field(default_factory=dict)
    # Physical GPU ids to hand out, gpus_per_replica per replica in order; default
    # 0 .. replicas × gpus_per_replica − 1. An id may repeat across replicas to share one
    # GPU (gpu_ids: [0, 0] runs two replicas on GPU 0), never within one replica.
    gpu_ids: list[int] | None = None
    # Share of a GPU's memory one replica may take (vLLM --gpu-memory-utilization, LMDeploy
    # --cache-max-entry-count). Left out while replicas share a GPU: 0.9 ÷ the most
    # replicas on one GPU. The shares on one GPU must add up to at most 0.95.
    gpu_memory_share: float | None = Field(default=None, gt=0, le=1)


def launch_issues(spec: ModelSpec, opts: LaunchOptions) -> list[SpecIssue]:
    """Checks across launch options and the spec (each option is already valid alone)."""
    issues: list[SpecIssue] = []
    if opts.restart_backoff_max_s < opts.restart_backoff_s:
        issues.append(
            SpecIssue(path="options.restart_backoff_max_s", message="must be ≥ restart_backoff_s")
        )
    if spec.gpus_per_replica and opts.gpu_ids is not None:
        need = spec.replicas * spec.gpus_per_replica
        if len(opts.gpu_ids) < need:
            issues.append(
                SpecIssue(
                    path="options.gpu_ids",
                    message=f"{len(opts.gpu_ids)} GPU ids for {spec.replicas} replicas × "
                    f"{spec.gpus_per_replica} GPUs each (need {need})",
                )
            )
        for i, ids in enumerate(gpu_assignment(spec, opts.gpu_ids)):
            if len(set(ids)) != len(ids):
                issues.append(
                    SpecIssue(
                        path="options.gpu_ids",
                        message=f"replica {i} would use GPU {ids} twice (an id may repeat "
                        "only across replicas, to share a GPU)",
                    )
                )
    sharing = replicas_per_gpu(spec, opts.gpu_ids)
    share = memory_share(spec, opts)
    if share is not None and sharing > 1 and share * sharing > 0.95:
        issues.append(
            SpecIssue(
                path="options.gpu_memory_share",
                message=f"{sharing} replicas share one GPU at {share:g} of its memory each "
                f"({share * sharing:g} > 0.95): give at most {0.95 / sharing:.2f}",
            )
        )
    if opts.base_port is not None and opts.base_port + spec.replicas - 1 > 65535:
        issues.append(SpecIssue(path="options.base_port", message="ports run past 65535"))
    if spec.attach:
        launch_keys = set(LaunchOptions.model_fields) - set(UpstreamOptions.model_fields)
        for key in spec.options:
            if key in launch_keys or key in type(opts).launch_only:
                issues.append(
                    SpecIssue(
                        path=f"options.{key}",
                        message="only used when the gateway launches workers "
                        "(this entry attaches to endpoints)",
                    )
                )
    return issues


@dataclass(frozen=True, slots=True)
class WorkerCommand:
    """One worker launch: what to run, with which extra environment, and where it listens."""

    label: str  # "vllm[0]": used in progress lines, log file names and errors
    argv: list[str]
    # Added to (and overriding) the gateway's own environment.
    env: dict[str, str]
    port: int
    host: str = "127.0.0.1"
    # The argv element holding the port, so a launch can move it to a free port.
    port_index: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def with_port(self, port: int) -> WorkerCommand:
        if self.port_index is None:
            raise ValueError(f"{self.label}: its argv has no port to move")
        argv = list(self.argv)
        argv[self.port_index] = str(port)
        return replace(self, argv=argv, port=port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it when binding port 0). Another
    process could take it before the worker binds; the worker then exits and is restarted."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def free_ports(host: str, n: int) -> int:
    """The first of `n` consecutive ports nothing listens on now (replicas' fixed ports)."""
    for _ in range(100):
        base = free_port(host)
        if base + n - 1 > 65535:
            continue
        try:
            for p in range(base + 1, base + n):
                with socket.socket() as s:
                    s.bind((host, p))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {n} consecutive free ports on {host}")


def gpu_assignment(spec: ModelSpec, gpu_ids: Sequence[int] | None) -> list[list[int]]:
    """The physical GPU ids of each replica: consecutive slices of `gpu_ids`
    (default 0, 1, …), `gpus_per_replica` each; empty lists when gpus_per_replica is 0."""
    g = spec.gpus_per_replica
    ids = list(gpu_ids) if gpu_ids is not None else list(range(spec.replicas * g))
    return [ids[i * g : (i + 1) * g] for i in range(spec.replicas)]


def replicas_per_gpu(spec: ModelSpec, gpu_ids: Sequence[int] | None) -> int:
    """The most replicas placed on one GPU (1 when none is shared, 0 without GPUs)."""
    counts: dict[int, int] = {}
    for ids in gpu_assignment(spec, gpu_ids):
        for g in set(ids):
            counts[g] = counts.get(g, 0) + 1
    return max(counts.values(), default=0)


def memory_share(spec: ModelSpec, opts: LaunchOptions) -> float | None:
    """The GPU memory share each replica gets: `gpu_memory_share`, or 0.9 ÷ the replicas
    on the busiest GPU when a GPU is shared, else None (the engine's own default)."""
    if opts.gpu_memory_share is not None:
        return opts.gpu_memory_share
    n = replicas_per_gpu(spec, opts.gpu_ids)
    return round(0.9 / n, 3) if n > 1 else None


def flag_name(key: str) -> str:
    """An `engine_args` key as the CLI's flag name, without dashes in front:
    `max_num_seqs`, `--max-num-seqs` and `max-num-seqs` are all `max-num-seqs`."""
    return key.lstrip("-").replace("_", "-")


def flag_args(args: Mapping[str, Any], *, negate_false: bool) -> list[str]:
    """`engine_args` → command-line flags, in the order given.

    `{"enforce-eager": true}` → `--enforce-eager`; false → `--no-enforce-eager` when the
    CLI has such flags (`negate_false`: vLLM's argparse makes `--no-X` for every boolean),
    else omitted (LMDeploy's booleans are `store_true` only); `None` → omitted; a list →
    one flag followed by its values (both CLIs declare list options `nargs='+'`/`'*'`, and
    a repeated flag would keep only the last); a dict → one JSON argument (vLLM parses
    dict-typed options as JSON). Keys may be written with `_` or `-`.
    """
    import json

    out: list[str] = []
    for key, value in args.items():
        flag = "--" + flag_name(key)
        if value is None:
            continue
        if value is True:
            out.append(flag)
        elif value is False:
            if negate_false:
                out.append("--no-" + flag[2:])
        elif isinstance(value, list | tuple):
            out.append(flag)
            out.extend(_scalar(v) for v in value)
        elif isinstance(value, dict):
            out += [flag, json.dumps(value, separators=(",", ":"))]
        else:
            out += [flag, _scalar(value)]
    return out


def _scalar(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def adapter_paths(spec: ModelSpec, config_dir: Path) -> dict[str, str]:
    """Start adapters' paths, relative ones against the directory of models.yaml."""
    out = {}
    for a in spec.lora.adapters if spec.lora else []:
        p = Path(a.path).expanduser()
        out[a.name] = str(p if p.is_absolute() else config_dir / p)
    return out


@dataclass(frozen=True, slots=True)
class ResolvedPaths:
    """What a launch passes to workers in place of models.yaml's references."""

    model: str
    draft_model: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
