"""``python -m bench``: run the benchmark (see bench/runner.py for the options)."""
import sys

from bench.runner import main

sys.exit(main())
