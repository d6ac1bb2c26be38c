"""The refinement service (`fastnefes serve`): HTTP + dynamic batching, in the optional extra
`fastnefes[serve]` (FastAPI, uvicorn, python-multipart, httpx), so the core install stays light.

fastnefes.serve.wire (the wire format) needs no extra; app and schemas do.
"""

from __future__ import annotations

from fastnefes.errors import FastnefesError

EXTRA_MODULES = {"fastapi": "fastapi", "pydantic": "pydantic", "uvicorn": "uvicorn", "multipart": "python-multipart",
                 "httpx": "httpx"}


def require_extra(*modules: str) -> None:
    """Raise a one-line FastnefesError when a module of the serve extra is missing."""
    import importlib.util

    missing = [EXTRA_MODULES.get(m, m) for m in (modules or EXTRA_MODULES) if importlib.util.find_spec(m) is None]
    if missing:
        raise FastnefesError(f"this needs the serve extra ({', '.join(missing)} not installed): pip install 'fastnefes[serve]'")
