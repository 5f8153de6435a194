"""`python -m distillery ...`: the same command line as the `distillery` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
