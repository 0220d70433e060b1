"""The cache keys of a build's steps: a chain of sha256, one link per step.

The first link is the content identity of the base (``identity``), so the keys say what was
built on what, not where: two stores with the same base and the same step file agree on every
key.  A shell step adds its text and the environment it runs with; a ``COPY`` adds the digest
of what it copies (``stepcopy.copy_digest``), not its text's spelling of the sources.
"""
from __future__ import annotations

import hashlib
import json

from .stepfile import Step

KEY_VERSION = "overlayfuse build v2"


def base_key(identity: str) -> str:
    """The key the first step chains on: the base's content identity."""
    return hashlib.sha256(f"{KEY_VERSION}\0base\0{identity}".encode()).hexdigest()


def step_key(parent: str, step: Step, copied: str = "") -> str:
    """The key of ``step`` after the step keyed ``parent``; ``copied`` is a COPY's digest."""
    if step.kind == "copy":
        what = f"copy\0{copied}"
    else:
        what = f"run\0{step.text}\0{json.dumps(step.env)}"
    return hashlib.sha256(f"{parent}\0{what}".encode("utf-8", "surrogateescape")).hexdigest()
