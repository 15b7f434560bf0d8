"""``python -m cotune``: the same command line as the ``cotune`` script."""

import sys

from cotune.cli import main

if __name__ == "__main__":
    sys.exit(main())
