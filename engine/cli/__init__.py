"""The ``studyvault`` command line (Typer). Each command group lives in its own module."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import StudyvaultError
from .common import State, err_console

app = typer.Typer(
    name="studyvault",
    help="Keep a medical practice's DICOM studies safe: image directories, archives, tasks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", envvar="STUDYVAULT_CONFIG", help="Config file to use."),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    ctx.obj = State(config_path=config, debug=debug)
    ctx.call_on_close(ctx.obj.close)


def _register() -> None:
    from . import setup_cmds, storage_cmds, study_cmds

    setup_cmds.register(app)
    study_cmds.register(app)
    storage_cmds.register(app)
    from . import archive_cmds

    archive_cmds.register(app)
    from . import task_cmds

    task_cmds.register(app)
    from . import integrity_cmds

    integrity_cmds.register(app)
    from . import service_cmds

    service_cmds.register(app)
    from . import estimate_cmds

    estimate_cmds.register(app)
    from . import ops_cmds

    ops_cmds.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI; a studyvault error is one line on stderr, exit 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("STUDYVAULT_DEBUG") == "1"
    try:
        app(args=args, prog_name="studyvault")
    except StudyvaultError as exc:
        if debug:
            raise
        err_console.print(
            f"studyvault: error: {exc}", markup=False, highlight=False, soft_wrap=True
        )
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("studyvault: interrupted", markup=False)
        sys.exit(130)
