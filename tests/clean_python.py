"""A fresh Python process with a minimal environment, watched while it runs some code.

``run_clean(code, *argv)`` runs ``code`` (a ``python -c`` script) in a new interpreter of this
virtual environment, from an empty folder, with ``HOME``, ``TMPDIR`` and the XDG folders pointing
at empty folders, no ``PATH`` (so no launcher can be found either) and no bytecode writing. Before
``code`` runs, an audit hook and a meta-path finder watch the process; after it, the process
prints one JSON line (:data:`MARK` first) with what they saw:

``modules``   the watched packages (:data:`WATCHED`, top-level names) found in ``sys.modules``
``attempts``  the hidden packages (``hide``, all watched ones by default) an import statement or
              ``find_spec`` asked for (the finder answers as if they were not installed, so a ``try: import cupy`` fallback is seen
              too, on machines with CuPy as on machines without it)
``writes``    files opened for writing, folders made, files renamed or removed
``spawned``   processes started (``subprocess``, ``os.system``, ``fork``, ``exec``, ``posix_spawn``)
``threads``   threads started (``_thread.start_new_thread``) and threads alive at the end
``dlopen``    shared libraries loaded through ``ctypes``
``sockets``   sockets connected or bound
``libraries`` shared libraries mapped into the process (``/proc/self/maps``) whose name says MPI,
              CUDA, NCCL, NVRTC, cuBLAS or NVIDIA

The caller gets ``(CompletedProcess, report dict or None)``; the folders it ran in are left in
``tmp`` for the caller to inspect.
"""

import json
import os
import subprocess
import sys

#: GPU stacks, MPI, frameworks, JIT compilers and the optional host packages the library
#: imports only when a call needs them.
WATCHED = ("mpi4py", "cupy", "cupy_backends", "cuda", "numba", "llvmlite", "ml_dtypes", "torch", "jax", "jaxlib",
           "tensorflow", "nvidia", "pynvml", "tqdm", "matplotlib")
MARK = "@@clean_python@@"

PRELUDE = r"""
import json as _json, os as _os, sys as _sys, threading as _threading
_WATCHED = %(watched)r
_HIDDEN = %(hidden)r
_SEEN = {"attempts": [], "writes": [], "spawned": [], "threads": [], "dlopen": [], "sockets": []}
_WRITE_FLAGS = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND


_ACTIVE = [True]


def _hook(event, args):
    if not _ACTIVE:  # after the report (an audit hook cannot be removed; finalization must not call into it)
        return
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or path is None:
            return
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS):
            _SEEN["writes"].append(("open", str(path)))
    elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.symlink", "os.link", "os.truncate",
                   "shutil.copyfile", "shutil.rmtree", "os.chmod"):
        _SEEN["writes"].append((event, repr(args[:2])))
    elif event in ("subprocess.Popen", "os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn",
                   "os.spawn", "os.startfile", "pty.spawn"):
        _SEEN["spawned"].append((event, repr(args)[:200]))
    elif event == "ctypes.dlopen" and args[0] is not None:  # None: the process itself (ctypes.pythonapi)
        _SEEN["dlopen"].append(str(args[0]))
    elif event in ("socket.connect", "socket.bind"):
        _SEEN["sockets"].append((event, repr(args[1:])[:200]))


class _Absent:
    # Every watched package reads as not installed, and each time it is asked for is recorded.
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in _HIDDEN:
            _SEEN["attempts"].append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tests/clean_python.py)", name=name)
        return None


def _watch_threads():
    # the "_thread.start_new_thread" audit event is newer than Python 3.11: wrap the function
    import _thread

    start = _thread.start_new_thread

    def start_new_thread(function, *args, **kwargs):
        _SEEN["threads"].append(repr(function)[:200])
        return start(function, *args, **kwargs)

    _thread.start_new_thread = _threading._start_new_thread = start_new_thread


if %(audit)r:
    _sys.addaudithook(_hook)
_watch_threads()
_sys.meta_path.insert(0, _Absent)


def _report():
    _ACTIVE.clear()
    out = dict(_SEEN)
    out["modules"] = sorted(m for m in _sys.modules if m.split(".")[0] in _WATCHED and _sys.modules[m] is not None)
    out["threads"] = out["threads"] + [t.name for t in _threading.enumerate() if t is not _threading.main_thread()]
    out["libraries"] = []
    try:
        with open("/proc/self/maps") as f:
            maps = {line.split()[-1] for line in f if "/" in line}
    except OSError:  # not Linux
        maps = set()
    import re as _re
    out["libraries"] = sorted(p for p in maps if _re.search(r"mpi|cuda|nccl|nvrtc|cublas|nvidia", _os.path.basename(p)))
    print(%(mark)r + _json.dumps(out), flush=True)


"""


def _prelude(hide, audit):
    return PRELUDE % {"watched": WATCHED, "hidden": tuple(hide), "audit": bool(audit), "mark": MARK}


def run_clean(code, *argv, tmp, hide=WATCHED, audit=True, pythonpath=(), env=None, timeout=120):
    """Run ``code`` with ``argv`` in a fresh interpreter (see the module doc); ``tmp`` is an empty
    folder for its cwd, home and temporary folders; the packages in ``hide`` read as not
    installed (``attempts`` lists only those); ``audit=False`` leaves the audit hook out (then
    ``writes``, ``spawned``, ``dlopen`` and ``sockets`` stay empty); ``pythonpath`` folders go on ``PYTHONPATH``,
    ``env`` adds variables. ``code`` must not call ``sys.exit`` before its end if the report is
    wanted. Returns ``(CompletedProcess, report or None)``."""
    tmp = os.fspath(tmp)
    dirs = {k: os.path.join(tmp, k.lower()) for k in ("CWD", "HOME", "TMPDIR", "XDG_CACHE_HOME",
                                                       "XDG_CONFIG_HOME", "XDG_DATA_HOME")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    full = {"PATH": "", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "PYTHONHASHSEED": "0",
            **{k: v for k, v in dirs.items() if k != "CWD"}}
    if pythonpath:
        full["PYTHONPATH"] = os.pathsep.join(os.fspath(p) for p in pythonpath)
    full.update(env or {})
    script = _prelude(hide, audit) + code + "\n_report()\n"
    res = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=timeout,
                         env=full, cwd=dirs["CWD"])
    report = None
    for line in res.stdout.splitlines():
        if line.startswith(MARK):
            report = json.loads(line[len(MARK):])
    return res, report


def left_behind(tmp):
    """Files and folders under ``tmp``'s cwd/home/temporary folders (``run_clean`` made them empty)."""
    out = []
    for top in ("cwd", "home", "tmpdir", "xdg_cache_home", "xdg_config_home", "xdg_data_home"):
        for root, ds, fs in os.walk(os.path.join(os.fspath(tmp), top)):
            out += [os.path.join(root, n) for n in ds + fs]
    return sorted(out)
