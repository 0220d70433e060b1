"""Small helpers several test modules share: the CLI as a subprocess, comparable outcomes."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


def ovf(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``python -m overlayfuse ARGS`` from this checkout; ``env`` adds to the environment."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.update(kw.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "overlayfuse", *args], capture_output=True,
                          text=True, env=env, timeout=120, **kw)


def outcome(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """``"ok"`` (or the call's value when not None) or the errno's name: comparable results."""
    try:
        r = fn(*args, **kw)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok" if r is None else r
