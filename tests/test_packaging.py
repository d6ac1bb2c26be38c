"""The package declares what it imports, and its console script fails politely.

The import scan reads every module of fastnefes with `ast`: a third-party package imported at
module level must be a core dependency; one imported only inside a function or a try block (an
optional fast path or extra) must be declared somewhere, core or extra. The console-script tests
run the installed `fastnefes` in a subprocess, as a user's shell would.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastnefes"


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module name, imported at module level outside try) for each import of a file."""
    tree = ast.parse(path.read_text(), str(path))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Try, ast.FunctionDef, ast.AsyncFunctionDef)):
            guarded.update(id(n) for n in ast.walk(node) if n is not node)
    if_type_checking = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test)]
    for node in if_type_checking:
        guarded.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], id(node) not in guarded) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], id(node) not in guarded))
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    """(core, every declared) distribution names of the installed fastnefes."""
    core, every = set(), set()
    for req in md.requires("fastnefes") or []:
        name = _normalise(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0])
        every.add(name)
        if "extra ==" not in req:
            core.add(name)
    return core, every


def test_every_import_is_declared():
    dists = {k: [_normalise(d) for d in v] for k, v in md.packages_distributions().items()}
    core, every = _declared()
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, top_level in _imports(path):
            if module in sys.stdlib_module_names or module in ("fastnefes", "__future__"):
                continue
            names = set(dists.get(module, [_normalise(module)]))
            need = core if top_level else every
            if not names & need:
                where = "at module level (must be a core dependency)" if top_level else "(not declared in any extra)"
                problems.append(f"{path.relative_to(PACKAGE.parent)} imports {module} {where}")
    assert not problems, "\n".join(problems)


def _console_script() -> str:
    exe = shutil.which("fastnefes", path=str(Path(sys.executable).parent)) or shutil.which("fastnefes")
    if exe is None:
        pytest.skip("the fastnefes console script is not installed (pip install -e .)")
    return exe


def _run(*args: str, env_extra: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FASTNEFES_DEBUG": "", **(env_extra or {})}
    return subprocess.run([_console_script(), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert err.startswith("error:") and err.count("\n") == 0, err
    return err


def test_console_script_bad_options_are_one_line(tmp_path):
    assert "bogus" in _one_line_error(_run("eval", "--bogus"))
    assert "--steps" in _one_line_error(_run("train", str(tmp_path), "--out", str(tmp_path / "r"), "--steps", "many"))
    assert "run" in _one_line_error(_run("refine"))


def test_console_script_non_text_files_are_one_line(tmp_path):
    garbage = tmp_path / "p.txt"
    garbage.write_bytes(b"\xff\xfe\x00garbage\n")
    err = _one_line_error(_run("eval", "--gt", str(garbage), "--pred", str(garbage)))
    assert str(garbage) in err and "UTF-8" in err
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a.png 1 0 0 0 0 0 0\n\x00\x01")
    err = _one_line_error(_run("perturb", str(nul), "--out", str(tmp_path / "o.txt")))
    assert f"{nul}:2" in err
    assert not (tmp_path / "o.txt").exists()


def test_console_script_internal_error_says_bug(tmp_path):
    """An unexpected exception: one line that says it is a bug and how to see the traceback
    (exit 1); with FASTNEFES_DEBUG=1 the traceback itself."""
    code = ("import sys; import fastnefes.cli as c; from fastnefes.cli.app import app\n"
            "@app.command('explode')\n"
            "def explode():\n    raise ZeroDivisionError('deliberate')\n"
            "sys.argv = ['fastnefes', 'explode']; c.main()\n")
    env = {**os.environ, "FASTNEFES_DEBUG": ""}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    err = _one_line_error(proc, code=1)
    assert "bug" in err and "ZeroDivisionError: deliberate" in err and "FASTNEFES_DEBUG=1" in err
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "FASTNEFES_DEBUG": "1"}, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
