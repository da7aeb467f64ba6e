"""``python -m benchmarks.checkpoint_io``: run by the Makefile's ``bench``, the tests and the memory probes."""

import sys

from benchmarks.checkpoint_io.cli import main

if __name__ == "__main__":
    sys.exit(main())
