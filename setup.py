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

setup(ext_modules=cythonize(extensions, compiler_directives=_directives))
