"""``python -m dpgather``: the ``dpgather`` command line (see :mod:`dpgather.cli`)."""

import sys

from dpgather.cli import main

if __name__ == "__main__":
    sys.exit(main())
