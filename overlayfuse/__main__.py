"""``python -m overlayfuse``: the same entry point as the ``overlayfuse`` console script."""
import sys

from overlayfuse.cli import main

if __name__ == "__main__":
    sys.exit(main())
