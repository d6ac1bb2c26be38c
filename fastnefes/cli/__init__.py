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


def _click_classes(name: str) -> tuple[type, ...]:
    """click's exception class `name` and, where typer vendors its own copy of click (typer >= 0.2x,
    whose exceptions do not derive from click's), that copy's class of the same name."""
    import click
    import typer

    found = {getattr(click.exceptions, name)}
    for public in (typer.BadParameter, typer.Abort):
        found.update(c for c in public.__mro__ if c.__name__ == name)
    return tuple(found)


def main() -> None:
    """Entry point: user errors (ours and bad command-line values) become one line on stderr and
    exit code 2."""
    from fastnefes.errors import FastnefesError
    from fastnefes.ops._allocator import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()  # per-step gradient buffers stay mapped (see ops/_allocator.py)
    try:
        app(standalone_mode=False)
    except FastnefesError as exc:
        console_err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except _click_classes("ClickException") as exc:
        console_err.print(f"[bold red]error:[/] {exc.format_message()}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except _click_classes("Abort"):
        console_err.print("[yellow]aborted[/]")
        sys.exit(130)
    except KeyboardInterrupt:
        console_err.print("[yellow]interrupted[/]")
        sys.exit(130)
