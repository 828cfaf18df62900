"""The `gateway` command: `serve`, `check`, `pull`, `sim`, `bench`, and the pipeline's
`merge`, `eval`, `quantize` (parsed and run by `pipeline.cli`).

Owns argument parsing and process set-up (logging, event loop, server). Each sub-command
hands over to the module that does the work.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engines import engine_class

if TYPE_CHECKING:
    from gateway.catalog import Catalog


def _serve(args: argparse.Namespace) -> int:

    from gateway.app import create_app
    from gateway.catalog import CatalogError
    from gateway.server_limits import uvicorn_config
    from gateway.settings import Settings

    overrides = {
        k: v
        for k, v in (("config", args.config), ("host", args.host), ("port", args.port))
        if v is not None
    }
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app = create_app(settings)
    except CatalogError as e:
        print(e, file=sys.stderr)
        return 2
    from gateway.drain import DrainingServer

    config = uvicorn_config(app, settings, timeout_graceful_shutdown=int(settings.drain_timeout_s))
    DrainingServer(config, app.state.gateway.served, settings.drain_accept_s).run()
    return 0


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
    from gateway.settings import Settings

    _, catalog = _catalog(args)
    if catalog is None:
        return 1
    ctx = EngineContext(
        cache_dir=Settings().cache_dir,
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


def _sim(argv: list[str]) -> int:
    from simulator.__main__ import serve_main  # the test instrument, imported only here

    return serve_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `sim` and `bench` own their flags entirely.
    if argv and argv[0] == "sim":
        return _sim(argv[1:])
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config", type=Path, help="models.yaml (default: $GATEWAY_CONFIG or ./models.yaml)"
    )
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8000)")
    check = sub.add_parser("check", help="validate models.yaml and show worker commands")
    check.add_argument("--config", type=Path)
    pull = sub.add_parser("pull", help="fetch and convert the models ahead of serving")
    pull.add_argument("--config", type=Path)
    sub.add_parser("sim", help="run the vLLM-compatible simulator (see `gateway sim -h`)")
    sub.add_parser("bench", help="load-test an OpenAI-compatible URL (see `gateway bench -h`)")
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
        return pipeline_cli.run(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "pull":
        return _pull(args)
    return _check(args)
