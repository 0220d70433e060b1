"""Benchmark harness: overlayfuse against kernel overlayfs, fuse-overlayfs and a plain directory.

Run ``python -m bench`` (``--quick`` for a seconds-long smoke run); see bench/runner.py.
"""
