"""``python manage.py pyfiq_worker``: ``pyfiq worker`` itself (the same options, the same code:
its logging, its graceful stop on SIGTERM/SIGINT, its health probes), starting from
``settings.PYFIQ``: the options default to the settings, and the backend is the settings' one
(its serializer and connection options included) with what the options change on top."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
import redis
from django.core.management.base import BaseCommand

from .....errors import PyfiqError
from .....ops import cli
from ....commands import worker_defaults as shared_defaults
from ...conf import DjangoSettings
from ...setup import current_settings

#: Django's own options, which ``manage.py`` has applied before the command runs.
DJANGO_OPTIONS = ("--settings", "--pythonpath")


def worker_defaults(conf: DjangoSettings) -> dict[str, Any]:
    """The settings as defaults of ``pyfiq worker``'s options."""
    return shared_defaults(str(conf.url), conf.settings, conf.queues, conf.concurrency, conf.stop_timeout)


def _builder(conf: DjangoSettings) -> Any:
    def build(url: str, prefix: str, shards: int | None, **tuning: Any) -> Any:
        # pyfiq worker raises batch_limit to 100 (and to --prefetch): the settings' value is the floor.
        tuning["batch_limit"] = max(conf.settings.batch_limit, tuning.get("prefetch") or 0)
        return conf.backend(url, prefix=prefix, shards=shards or conf.settings.shards, **tuning)

    return build


def _without_django_options(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in DJANGO_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in DJANGO_OPTIONS)):
            out.append(arg)
    return out


def run_worker(args: list[str], prog_name: str) -> None:
    """Run ``pyfiq worker`` with ``args``, as its command line would, on the settings: what it
    cannot run with (a usage error, Redis refusing it) ends the process with one line."""
    conf = current_settings()
    try:
        with cli.worker.make_context(prog_name, args, default_map=worker_defaults(conf)) as ctx:
            ctx.meta[cli.BACKEND_FACTORY] = _builder(conf)
            cli.worker.invoke(ctx)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (PyfiqError, redis.RedisError) as exc:
        # pyfiq's errors name the server without its password.
        click.echo(f"Error: {cli.show(exc)}", err=True)
        sys.exit(1)


class Command(BaseCommand):  # type: ignore[misc]  # Django ships no type information
    help = (
        "Run a pyfiq worker for this project's @fifo functions until SIGTERM/SIGINT (graceful). "
        "The options of `pyfiq worker`, defaulting to settings.PYFIQ: see --help."
    )

    def run_from_argv(self, argv: list[str]) -> None:
        # The options are pyfiq worker's, parsed by its own (click) command, not argparse.
        run_worker(_without_django_options(argv[2:]), f"{os.path.basename(argv[0])} {argv[1]}")

    def print_help(self, prog_name: str, subcommand: str) -> None:
        run_worker(["--help"], f"{prog_name} {subcommand}")

    def handle(self, *args: Any, **options: Any) -> None:
        # call_command("pyfiq_worker"): the settings' defaults.
        run_worker([], "pyfiq_worker")
