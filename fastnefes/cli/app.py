"""The typer app and the consoles every command module shares."""

import typer
from rich.console import Console

app = typer.Typer(
    name="fastnefes",
    help="Fast neural feature fields for camera pose refinement.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
console_err = Console(stderr=True)
