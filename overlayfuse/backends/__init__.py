"""Backends: kernel (mount(2)), kernel-userns (private namespace, run only), fuse (our daemon)."""
from .base import Backend, CommandError, Mount, Verdict
from .choose import BACKEND_NAMES, PREFERENCE, choose, get_backend

__all__ = ["Backend", "CommandError", "Mount", "Verdict", "BACKEND_NAMES", "PREFERENCE",
           "choose", "get_backend"]
