"""The `fastnefes` command line: typer commands, rich output, no pipeline logic.

Every module `fastnefes/cli/commands_*.py` registers its commands on the shared `app`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from fastnefes.cli.app import app, console_err

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("commands_")):
    importlib.import_module(f"{__name__}.{_mod}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    import click

    from fastnefes.errors import FastnefesError
    from fastnefes.ops._allocator import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()  # per-step gradient buffers stay mapped (see ops/_allocator.py)
    try:
        app(standalone_mode=False)
    except FastnefesError as exc:
        console_err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        console_err.print("[yellow]aborted[/]")
        sys.exit(130)
    except KeyboardInterrupt:
        console_err.print("[yellow]interrupted[/]")
        sys.exit(130)
