"""``python -m moekit ...``: the ``moekit`` command (see :mod:`moekit.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
