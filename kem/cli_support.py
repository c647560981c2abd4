"""What every ``kem`` command shares, below the commands themselves (the main CLI, ``kem eval``,
``kem serve`` and the others import it; it imports none of them): how a Typer app runs and exits."""

from __future__ import annotations

import sys
from typing import NoReturn

import typer

from kem.errors import KemError


def run_app(typer_app: typer.Typer) -> NoReturn:
    """Run a Typer app as a command and exit with its status: 0 done; 2 an error (``error: ...`` on
    stderr, for every :class:`~kem.errors.KemError`) or a usage error; 130 interrupted; a command's
    own ``typer.Exit(code)`` (``kem consolidate``: 1 when the gates refuse) as given."""
    try:
        code = typer_app(standalone_mode=False)  # returns a typer.Exit's code instead of exiting
    except KemError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # usage errors: click's, or typer's vendored copy of click (not a click subclass)
        show, usage_code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(usage_code, int):
            show()
            sys.exit(usage_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)
