"""The ``medcourier`` command line: run, check, and the sub-commands plugins add."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
from collections.abc import Sequence

from medcourier import __version__
from medcourier.engine import logging as mclog
from medcourier.engine.config import load_config
from medcourier.engine.errors import ConfigError, PluginError
from medcourier.engine.event_loop import loop_factory
from medcourier.engine.plugins import Plugins, load_plugins
from medcourier.engine.signals import until_signalled


def _parser(plugins: Plugins) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medcourier", description=__doc__)
    parser.add_argument("--version", action="version", version=f"medcourier {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the engine with a config file")
    run.add_argument("--config", "-c", required=True, help="YAML configuration file")
    run.add_argument(
        "--role",
        choices=("all", "api", "listener", "worker"),
        default="all",
        help="what this process runs (several processes share one RabbitMQ and PostgreSQL): "
        "api = the HTTP API, listener = inbound channels, worker = route workers; default all",
    )
    check = sub.add_parser("check", help="validate a config file and exit (non-zero if invalid)")
    check.add_argument("config", help="YAML configuration file")
    render = sub.add_parser(
        "render", help="print what a route would send for a document, without sending it"
    )
    render.add_argument("--config", "-c", required=True, help="YAML configuration file")
    render.add_argument("--route", "-r", required=True, help="route name")
    render.add_argument(
        "--input", "-i", required=True, help="document JSON (see config/examples/document.json)"
    )
    render.add_argument("--out", "-o", help="write the rendering to this file instead of stdout")
    prune = sub.add_parser("prune", help="prune what retention allows now; show the store size")
    prune.add_argument("--config", "-c", required=True, help="YAML configuration file")
    prune.add_argument("--dry-run", action="store_true", help="count only, delete nothing")
    prune.add_argument(
        "--vacuum", action="store_true", help="then VACUUM (SQLite: stop the engine first)"
    )
    from medcourier.engine import admin_cli  # replay, cancel, pause, resume, journal

    admin_cli.add_parsers(sub)
    for command in plugins.commands.values():
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    return parser


async def _run(config_path: str, plugins: Plugins, role: str = "all") -> int:
    from medcourier.engine.service import Engine

    config = load_config(config_path, plugins)
    mclog.configure(config.settings.log_level)
    engine = Engine(config, plugins)
    try:
        await engine.start(role=role)
    except ValueError as exc:
        print(f"medcourier: {exc}", file=sys.stderr)
        return 2
    api = f"FHIR API on {engine.base_url}/fhir, " if role in ("all", "api") else ""
    print(
        f"medcourier {__version__} ({role}): {api}"
        f"{len(config.routes)} route(s), data in {config.settings.data_dir}",
        file=sys.stderr,
        flush=True,
    )
    try:
        await until_signalled()
    finally:
        await engine.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        plugins = load_plugins()
    except PluginError as exc:
        print(f"medcourier: plugin error: {exc}", file=sys.stderr)
        return 2
    args = _parser(plugins).parse_args(argv)
    try:
        if args.command == "check":
            config = load_config(args.config, plugins)
            print(f"{args.config}: OK ({len(config.routes)} route(s))")
            return 0
        if args.command == "run":
            with asyncio.Runner(loop_factory=loop_factory()) as runner:  # engine/event_loop.py
                return runner.run(_run(args.config, plugins, args.role))
        if args.command == "render":
            from medcourier.engine.render_cli import render_command

            return render_command(args, plugins)
        if args.command == "prune":
            from medcourier.engine.prune_cli import prune_command

            mclog.configure("warning")
            return prune_command(args, plugins)
        if args.command in ("replay", "cancel", "pause", "resume", "journal"):
            from medcourier.engine import admin_cli

            mclog.configure("warning")
            return admin_cli.run(args, plugins)
        mclog.configure("info")
        result = plugins.commands[args.command].run(args)
        if inspect.isawaitable(result):
            return int(asyncio.run(_awaited(result)))
        return int(result)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _awaited(result: object) -> int:
    assert inspect.isawaitable(result)
    return int(await result)


if __name__ == "__main__":
    sys.exit(main())
