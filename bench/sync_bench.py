"""Per-step sync latency (repository entry point): the program is ``dpgather.tools.sync_bench``.

    mpiexec -n T python bench/sync_bench.py [--iters 2000] [--warmup 200] [--attn-tp A]
                                            [--policy sglang] [--json PATH]

is the same as ``dpgather bench-sync --np T`` or ``mpiexec -n T python -m dpgather.tools.sync_bench``
(which work from an installed wheel too). See that module for what is measured.
"""

import sys

from dpgather.tools.sync_bench import main

if __name__ == "__main__":
    sys.exit(main(prog="bench/sync_bench.py"))
