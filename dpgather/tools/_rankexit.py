"""Run one rank's Python program and record how it ended.

    python -m dpgather.tools._rankexit STATUS_DIR (SCRIPT | -m MODULE | -c CODE) [ARGS...]

The launcher (:func:`dpgather.tools.launch.run_job`) starts every rank through this module,
because Open MPI started with dpgather's one-box settings returns 0 from ``mpirun`` even when
ranks exit non-zero. The program runs as ``__main__`` in this process (it *is* the MPI rank);
when it ends -- normally, by ``sys.exit`` or by an uncaught exception (traceback printed) --
its exit code is written to ``STATUS_DIR/rank-<r>`` (``r`` from the launcher's rank variable),
then the process exits with that code. A rank killed by a signal or ended by ``os._exit``
writes nothing, which the launcher reads as a failure.
"""

import os
import runpy
import sys
import traceback

from dpgather.core.files import write_atomic

_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MPI_LOCALRANKID")


def _rank():
    for var in _RANK_VARS:
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def _code(exc):
    """The exit status of ``SystemExit(exc.code)``, as Python itself computes it."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _run(args):
    if not args:
        raise SystemExit("dpgather.tools._rankexit: no program given")
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        if not os.path.isfile(args[0]):  # as `python nosuch.py` says it: one line, exit 2
            print(f"{sys.executable}: can't open file {os.path.abspath(args[0])!r}: no such file",
                  file=sys.stderr)
            raise SystemExit(2)
        sys.argv = list(args)
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
        runpy.run_path(args[0], run_name="__main__")


def main():
    status_dir, args = sys.argv[1], sys.argv[2:]
    code = 1
    try:
        _run(args)
        code = 0
    except SystemExit as e:
        code = _code(e)
    except BaseException:  # noqa: BLE001 - the program's own uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        try:
            write_atomic(os.path.join(status_dir, f"rank-{_rank()}"), str(code))
        except OSError:
            pass
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
