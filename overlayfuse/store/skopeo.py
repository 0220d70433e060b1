"""Images between places through ``skopeo``: registries, OCI layouts and archives, podman's store.

The OCI registry is the engine that moves layers between machines; skopeo (Debian's package)
speaks it, with podman's options (``--tls-verify=false``, ``--authfile``, the containers auth
file by default), so nothing here talks HTTP itself.  The store always hands skopeo a local OCI
layout whose blobs live in the store's blob dir (``--*-shared-blob-dir``): a blob the other
side already has is not sent again, and one the store has is not fetched again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import OverlayfuseError

TRANSPORTS = ("oci:", "oci-archive:", "docker://", "containers-storage:")
_MISSING = re.compile(r"manifest unknown|not found|no such image|does not exist|"
                      r"no descriptor found|404", re.I)


@dataclass(frozen=True)
class Access:
    """How to reach a registry: TLS checked (podman's default), an auth file or the default."""

    tls_verify: bool = True
    authfile: str | None = None


def check_ref(ref: str, what: str) -> str:
    """A reference in containers-transports(5) syntax that we handle, else one line."""
    if not ref.startswith(TRANSPORTS):
        raise OverlayfuseError(f"{what} {ref!r}: name a transport: oci:DIR[:TAG], "
                               "oci-archive:FILE[:TAG], docker://HOST/NAME:TAG or "
                               "containers-storage:IMAGE")
    if ref.startswith("containers-storage:") and shutil.which("podman") is None:
        raise OverlayfuseError(f"{what} {ref!r}: containers-storage needs podman")
    return ref


def _skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        raise OverlayfuseError("the skopeo command is missing (Debian's package skopeo)")
    return path


def _flags(ref: str, side: str, access: Access) -> list[str]:
    out = []
    if ref.startswith("docker://"):
        out.append(f"--{side}tls-verify={'true' if access.tls_verify else 'false'}")
    if access.authfile and ref.startswith(("docker://", "containers-storage:")):
        out.append(f"--{side}authfile={access.authfile}")
    return out


def _error(stderr: str) -> str:
    """skopeo's fatal message, without its log decoration."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    if not lines:
        return "skopeo failed"
    last = lines[-1]
    m = re.search(r'msg="((?:[^"\\]|\\.)*)"', last)
    if not m:
        return last
    # Go's quoting: a message with lists in it carries \n and \t escapes
    text = m.group(1).replace('\\"', '"').replace("\\n", " ").replace("\\t", " ")
    return " ".join(text.split())


def _run(argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=3600)
    except subprocess.TimeoutExpired:
        raise OverlayfuseError(f"{what}: skopeo took more than an hour") from None
    return r


def copy(src: str, dest: str, access: Access, *, src_blobs: str | None = None,
         dest_blobs: str | None = None, what: str | None = None) -> None:
    """``skopeo copy SRC DEST``; a failure is one line, starting with ``what`` (the user's
    words for it: the store's temporary layout means nothing to them)."""
    argv = [_skopeo(), "copy", "-q", "--retry-times=0", *_flags(src, "src-", access),
            *_flags(dest, "dest-", access)]
    if src_blobs:
        argv.append(f"--src-shared-blob-dir={src_blobs}")
    if dest_blobs:
        argv.append(f"--dest-shared-blob-dir={dest_blobs}")
    what = what or f"cannot copy {src} to {dest}"
    r = _run(argv + ["--", src, dest], what)
    if r.returncode != 0:
        raise OverlayfuseError(f"{what}: {_error(r.stderr)}")


def oci_parts(ref: str) -> tuple[str, str | None]:
    """``oci:DIR[:TAG]`` as (DIR, TAG or None)."""
    body = ref[len("oci:"):]
    path, sep, tag = body.rpartition(":")
    if sep and "/" not in tag and tag:
        return path, tag
    return body, None


def exists(ref: str, access: Access) -> bool:
    """Whether ``ref`` names an image: a look at an OCI layout's index, else one manifest
    request; an unreachable place is an error, not a "no"."""
    check_ref(ref, "image")
    if ref.startswith("oci:"):
        path, tag = oci_parts(ref)
        try:
            with open(os.path.join(path, "index.json"), encoding="utf-8") as f:
                index = json.load(f)
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as e:
            raise OverlayfuseError(f"cannot read the OCI layout {path}: {e}") from None
        names = [m.get("annotations", {}).get("org.opencontainers.image.ref.name")
                 for m in index.get("manifests", [])]
        return (tag in names) if tag else bool(names)
    argv = [_skopeo(), "inspect", "--raw", "--retry-times=0", *_flags(ref, "", access), ref]
    r = _run(argv, f"inspect {ref}")
    if r.returncode == 0:
        return True
    msg = _error(r.stderr)
    if _MISSING.search(msg) and "connection refused" not in msg.lower():
        return False
    raise OverlayfuseError(f"cannot look up {ref}: {msg}")
