"""``python -m dpgather``: the ``dpgather`` command line (see :mod:`dpgather.tools.cli`)."""

import sys

from dpgather.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
