"""Build the Cython planner; everything else is declared in pyproject.toml."""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

_trace = os.environ.get("DPGATHER_CYTHON_TRACE") == "1"
_directives = {"language_level": 3, "binding": True, "embedsignature": True}
if _trace:
    _directives["linetrace"] = True

extensions = [
    Extension(
        "dpgather.core._planner",
        ["core/_planner.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
        + ([("CYTHON_TRACE_NOGIL", "1")] if _trace else []),
        extra_compile_args=["-O3"],
    )
]

# `python setup.py sdist` / `bdist_wheel` default to dist/, a source folder here (dpgather.dist):
# their output goes to wheelhouse/ unless --dist-dir says otherwise (the PEP 517 backend,
# build_backend/dpgather_build.py, always passes its own folder and refuses dist/).
_OUT = {"dist_dir": "wheelhouse"}
setup(ext_modules=cythonize(extensions, compiler_directives=_directives),
      options={"sdist": dict(_OUT), "bdist": dict(_OUT), "bdist_wheel": dict(_OUT)})
