"""The `gateway` command: `serve`, `check`, `pull`, `keys`, `sim`, `bench`, and the
pipeline's `merge`, `eval`, `quantize`, `awq-export` (parsed and run by `pipeline.cli`).

Owns argument parsing, the user-facing help texts and process set-up (logging, event
loop, server); a bad `GATEWAY_*` value ends the process with exit status 2 and one line
per variable. Each sub-command hands over to the module that does the work.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engines import engine_class

if TYPE_CHECKING:
    from gateway.catalog import Catalog
    from gateway.settings import Settings

DESCRIPTION = """\
An OpenAI-compatible LLM gateway: one URL for /v1/chat/completions, /v1/completions,
/v1/embeddings and /v1/models in front of the models listed in models.yaml.
"""

EPILOG = """\
Process settings are GATEWAY_* environment variables (GATEWAY_HOST, GATEWAY_PORT,
GATEWAY_CONFIG, GATEWAY_API_KEYS, GATEWAY_ADMIN_KEY, GATEWAY_LOG_LEVEL, ...; the README
lists them all). Run `gateway COMMAND -h` for a command's options.
"""


def _serve(args: argparse.Namespace) -> int:

    from gateway.app import create_app
    from gateway.catalog import CatalogError
    from gateway.server_limits import uvicorn_config

    overrides = {
        k: v
        for k, v in (
            ("config", args.config),
            ("host", args.host),
            ("port", args.port),
            ("workers", args.workers),
        )
        if v is not None
    }
    settings = _settings(**overrides)
    if settings is None:
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.workers > 1:
        from gateway.catalog import load_catalog
        from gateway.workers import serve_workers

        # Checked here, once: a front door that cannot load its catalog dies, and the
        # supervisor would start it again forever.
        try:
            load_catalog(settings.config)
        except CatalogError as e:
            print(e, file=sys.stderr)
            return 2
        return serve_workers(settings)
    try:
        app = create_app(settings)
    except CatalogError as e:
        print(e, file=sys.stderr)
        return 2
    from gateway.drain import DrainingServer
    from gateway.server_limits import listen_sockets

    # On SIGTERM: readiness 503, GATEWAY_DRAIN_ACCEPT_S of accepting, then requests in
    # flight get GATEWAY_DRAIN_SECONDS to finish (gateway/drain.py).
    config = uvicorn_config(app, settings, timeout_graceful_shutdown=settings.drain_seconds)
    server = DrainingServer(config, app.state.gateway.served, settings.drain_accept_s)
    server.run(sockets=listen_sockets(config, settings) if settings.admin_port else None)
    return 0


def _settings(**overrides: Any) -> Settings | None:
    """The process settings; None (one line per bad variable printed) if invalid."""
    from gateway.settings import SettingsError, load_settings

    try:
        return load_settings(**overrides)
    except SettingsError as e:
        for line in e.lines:
            print(f"gateway: {line}", file=sys.stderr)
        return None


def _catalog(args: argparse.Namespace) -> tuple[Path, Catalog | None]:
    """models.yaml from --config or $GATEWAY_CONFIG; None (problems printed) if invalid."""
    from gateway.catalog import CatalogError, load_catalog
    from gateway.settings import Settings

    path = args.config or Settings().config
    try:
        return path, load_catalog(path)
    except CatalogError as e:
        print(e, file=sys.stderr)
        return path, None


def _check(args: argparse.Namespace) -> int:
    path, catalog = _catalog(args)
    if catalog is None:
        return 1
    print(f"{path}: {len(catalog.models)} model(s), valid")
    for spec in catalog.models:
        where = (
            f"attach {', '.join(spec.endpoints)}"
            if spec.endpoints
            else f"{spec.replicas} replica(s)"
        )
        print(f"- {spec.name}: engine {spec.engine}, {spec.task}, {where}")
        for argv in engine_class(spec.engine).launch_commands(spec):
            print(f"    $ {shlex.join(argv)}")
    return 0


def _pull(args: argparse.Namespace) -> int:
    """Fetch and convert what every model needs, without serving (image builds, CI)."""
    from engines.base import EngineContext

    settings = _settings()
    if settings is None:
        return 2
    _, catalog = _catalog(args)
    if catalog is None:
        return 1
    ctx = EngineContext(
        cache_dir=settings.cache_dir,
        config_dir=catalog.base_dir,
        progress=lambda line: print(line, flush=True),
    )
    for spec in catalog.models:
        line = engine_class(spec.engine).prefetch(spec, ctx)
        if line is None:
            print(f"- {spec.name}: engine {spec.engine} fetches nothing ahead")
            continue
        print(f"- {spec.name}: {line}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    """`gateway keys create|list|revoke|usage` against $GATEWAY_REDIS_URL or
    $GATEWAY_KEYS_FILE (the same records the admin API writes)."""
    import asyncio
    import json
    import time

    from engines.base import ServingError
    from gateway.key_admin import KeyAdmin
    from gateway.limits import Tenancy
    from gateway.settings import Settings

    overrides = {"keys_file": args.keys_file} if args.keys_file else {}
    settings = Settings(**overrides)

    async def run() -> object:
        tenancy = Tenancy(settings)
        await tenancy.start()
        admin = KeyAdmin(tenancy)
        try:
            if args.action == "create":
                policy: dict[str, object] = {
                    k: v
                    for k, v in (
                        ("name", args.name),
                        ("rpm", args.rpm),
                        ("tpm", args.tpm),
                        ("max_parallel", args.max_parallel),
                        ("budget_tokens", args.budget_tokens),
                    )
                    if v is not None
                }
                if args.models:
                    policy["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
                if args.expires_days is not None:
                    policy["expires_at"] = time.time() + args.expires_days * 86400
                token, record = await admin.create(policy)
                return {"key": token, **record.public()}
            if args.action == "list":
                return await admin.list()
            if args.action == "revoke":
                return await admin.revoke(args.id)
            return await admin.usage(args.id)
        finally:
            await tenancy.close()

    try:
        out = asyncio.run(run())
    except ServingError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1))
    if args.action == "create":
        print("The key is shown once; only its salted hash is stored.", file=sys.stderr)
    return 0


def _sim(argv: list[str]) -> int:
    from simulator.__main__ import serve_main  # the test instrument, imported only here

    return serve_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `sim` and `bench` own their flags entirely.
    if argv and argv[0] == "sim":
        return _sim(argv[1:])
    parser = argparse.ArgumentParser(
        prog="gateway",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    config_help = "the models file (default: $GATEWAY_CONFIG, else ./models.yaml)"
    serve = sub.add_parser(
        "serve",
        help="serve the models in models.yaml",
        description="Start the models in models.yaml and serve the OpenAI API, /health, "
        "/metrics, /docs and the status page /ui until Ctrl-C, SIGTERM or SIGHUP (which drain "
        "requests in flight). The first start downloads and converts the models, with "
        "progress output; later starts take seconds.",
    )
    serve.add_argument("--config", type=Path, help=config_help)
    serve.add_argument("--host", help="address to listen on (default: $GATEWAY_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: $GATEWAY_PORT, 8000)")
    serve.add_argument(
        "--workers", type=int, help="front-door processes (default: $GATEWAY_WORKERS, 1)"
    )
    check = sub.add_parser(
        "check",
        help="validate models.yaml; print every worker command line",
        description="Check models.yaml without starting anything: prints each model and "
        "the exact command line of every worker it would launch. Exit status 1 if invalid.",
    )
    check.add_argument("--config", type=Path, help=config_help)
    pull = sub.add_parser(
        "pull",
        help="download and convert every model now (image builds, CI)",
        description="Fetch and convert what every model needs into the cache "
        "($GATEWAY_CACHE_DIR) without serving, so a later `gateway serve` starts offline.",
    )
    pull.add_argument("--config", type=Path, help=config_help)
    keys = sub.add_parser("keys", help="create, list, revoke API keys and read their usage")
    keys.add_argument("--keys-file", type=Path, help="default: $GATEWAY_KEYS_FILE")
    kact = keys.add_subparsers(dest="action", required=True)
    create = kact.add_parser("create", help="mint a key (printed once)")
    create.add_argument("--name")
    create.add_argument("--models", help="comma-separated model names (default: all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--max-parallel", type=int)
    create.add_argument("--budget-tokens", type=int, help="lifetime token budget")
    create.add_argument("--expires-days", type=float)
    kact.add_parser("list", help="list keys (no secrets)")
    for verb in ("revoke", "usage"):
        kact.add_parser(verb).add_argument("id")
    sub.add_parser(
        "sim", help="run the vLLM-compatible simulator, a test worker (`gateway sim -h`)"
    )
    sub.add_parser("bench", help="load-test an OpenAI-compatible URL (`gateway bench -h`)")
    # --- pipeline (issue 13): merge / eval / quantize, all in pipeline/ ----------------
    from pipeline import cli as pipeline_cli

    pipeline_cli.add_commands(sub)
    # --- end pipeline -------------------------------------------------------------------
    if argv and argv[0] == "bench":
        from loadgen.cli import add_arguments, run

        bench = argparse.ArgumentParser(
            prog="gateway bench", description="Load-test an OpenAI-compatible URL."
        )
        add_arguments(bench)
        return run(bench.parse_args(argv[1:]))
    args = parser.parse_args(argv)
    if args.command in pipeline_cli.COMMANDS:  # pipeline (issue 13)
        from gateway.settings import Settings

        return pipeline_cli.run(args, Path(Settings().cache_dir))
    if args.command == "serve":
        return _serve(args)
    if args.command == "pull":
        return _pull(args)
    if args.command == "keys":
        return _keys(args)
    return _check(args)
