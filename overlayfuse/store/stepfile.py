"""The step file of ``overlayfuse build``: shell steps, ``COPY`` and ``ENV``, as a Containerfile.

Read whole before anything runs, so a bad line (a malformed ``ENV``, a ``COPY`` source that is
missing or leaves the step file's directory) is one error naming its line and nothing is built.
A line is one shell step unless it starts with ``COPY`` or ``ENV``; blank lines and ``#``
comments are skipped and a trailing ``\\`` continues a line.  ``ENV`` is no step of its own: it
changes the environment of the steps after it, and so their keys.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
from dataclasses import dataclass, field

from ..errors import OverlayfuseError
from ..sandbox.launch import DEFAULT_PATH

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Step:
    """One step: ``kind`` is ``run`` (``text`` for ``sh -c``) or ``copy`` (``sources``, host
    paths already checked, into ``dest`` in the tree); ``env`` is what it runs with."""

    number: int
    line: int
    kind: str
    text: str
    env: tuple[tuple[str, str], ...]
    sources: tuple[str, ...] = ()
    dest: str = ""
    context: str = field(default="", compare=False)


def read_steps(path: str, cli_env: dict[str, str]) -> list[Step]:
    """The steps of the step file ``path``, each with the environment it runs with: the fixed
    base, the ``ENV`` lines before it, and ``cli_env`` (``--env``), which wins over them."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise OverlayfuseError(f"cannot read the step file {path}: {why}") from None
    context = os.path.dirname(os.path.realpath(path))
    fixed = set(cli_env)
    current = {**base_env(), **cli_env}
    steps: list[Step] = []
    for line, words in logical_lines(text):
        where = f"{path}:{line}"
        head, _, rest = words.partition(" ")
        if head == "ENV":
            for name, value in parse_env(rest, where):
                if name not in fixed:
                    current[name] = value
            continue
        frozen = tuple(sorted(current.items()))
        if head == "COPY":
            sources, dest = parse_copy(rest, context, where)
            steps.append(Step(len(steps) + 1, line, "copy", words, frozen, sources, dest,
                              context))
        else:
            steps.append(Step(len(steps) + 1, line, "run", words, frozen))
    if not steps:
        raise OverlayfuseError(f"the step file {path} has no steps")
    return steps


def parse_steps(text: str) -> list[str]:
    """The logical lines of ``text`` (comments, blank lines and continuations resolved)."""
    return [words for _, words in logical_lines(text)]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(line number where it starts, text) of each logical line."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        elif not line.strip() or line.lstrip().startswith("#"):
            continue
        else:
            start = number
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        out.append((start, line.strip()))
    if pending:
        out.append((start, pending.strip()))
    return out


def base_env() -> dict[str, str]:
    """What every step starts with: fixed, so no caller's variable reaches a step or its key."""
    return {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "dumb", "LANG": "C.UTF-8"}


def parse_env(text: str, where: str) -> list[tuple[str, str]]:
    """``NAME=VALUE ...`` (shell quoting) of an ENV line or ``--env``."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise OverlayfuseError(f"{where}: ENV: {e}") from None
    if not words:
        raise OverlayfuseError(f"{where}: ENV needs NAME=VALUE")
    out = []
    for word in words:
        name, eq, value = word.partition("=")
        if not eq or not ENV_NAME.match(name):
            raise OverlayfuseError(f"{where}: ENV expects NAME=VALUE, not {word!r}")
        out.append((name, value))
    return out


def parse_copy(text: str, context: str, where: str) -> tuple[tuple[str, ...], str]:
    """``SRC... DST``: sources relative to ``context`` (globs expanded, sorted), each inside
    it after symlinks are resolved; ``DST`` absolute or relative to ``/``."""
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise OverlayfuseError(f"{where}: COPY: {e}") from None
    if len(words) < 2:
        raise OverlayfuseError(f"{where}: COPY needs SRC... DST")
    *patterns, dest = words
    if "\0" in dest:
        raise OverlayfuseError(f"{where}: COPY destination contains a NUL byte")
    sources: list[str] = []
    for pattern in patterns:
        if os.path.isabs(pattern):
            raise OverlayfuseError(f"{where}: COPY source {pattern} must be relative to the "
                                   f"step file's directory {context}")
        full = os.path.join(context, pattern)
        matches = sorted(glob.glob(glob.escape(context) + os.sep + pattern)) \
            if glob.has_magic(pattern) else [full]
        if not matches:
            raise OverlayfuseError(f"{where}: COPY source {pattern}: nothing matches in "
                                   f"{context}")
        for match in matches:
            real = os.path.realpath(match)
            if real != context and not real.startswith(context + os.sep):
                raise OverlayfuseError(f"{where}: COPY source {pattern} leaves the step file's "
                                       f"directory {context}")
            if not os.path.exists(real):
                raise OverlayfuseError(f"{where}: COPY source {pattern}: no such file or "
                                       f"directory in {context}")
            sources.append(real)
    if not dest.startswith("/"):
        dest = "/" + dest
    if len(sources) > 1 and not dest.endswith("/"):
        dest += "/"      # several sources: DST is a directory, as in a Containerfile
    return tuple(sources), dest
