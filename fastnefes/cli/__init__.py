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


def _is_instance_of_named(exc: BaseException, name: str) -> bool:
    """Whether exc's class or a base is called `name`. click's exceptions are matched by name:
    typer >= 0.2x raises those of its own vendored copy of click (typer._click), which do not
    derive from click's, and click itself need not be installed at all."""
    return any(cls.__name__ == name for cls in type(exc).__mro__)


def _fail(message: str, code: int) -> None:
    console_err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


def main() -> None:
    """Entry point. A user error (ours, or a bad option or value on the command line) is one
    line on stderr and exit code 2; an unexpected error is one line saying it is a bug, exit
    code 1, with the traceback only under FASTNEFES_DEBUG=1."""
    import os

    from rich.markup import escape

    from fastnefes.errors import FastnefesError
    from fastnefes.ops._allocator import keep_freed_memory_in_heap

    debug = os.environ.get("FASTNEFES_DEBUG", "").strip() not in ("", "0")
    keep_freed_memory_in_heap()  # per-step gradient buffers stay mapped (see ops/_allocator.py)
    try:
        app(standalone_mode=False)
    except FastnefesError as exc:
        _fail(escape(str(exc)), 2)
    except KeyboardInterrupt:
        console_err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        if _is_instance_of_named(exc, "ClickException"):  # usage errors: bad option, value, missing argument
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            code = getattr(exc, "exit_code", 2)
            _fail(escape(message) + ("" if code != 2 else " (see --help)"), code)
        if _is_instance_of_named(exc, "Abort"):
            console_err.print("[yellow]aborted[/]")
            sys.exit(130)
        if debug:
            raise
        where = ""
        tb = exc.__traceback__
        while tb is not None:
            where = f" at {os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
            tb = tb.tb_next
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _fail(escape(f"internal error, a bug in fastnefes: {type(exc).__name__}{': ' + first if first else ''}{where}. "
                     "Run again with FASTNEFES_DEBUG=1 for the full traceback, and please report it."), 1)
