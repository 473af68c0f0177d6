"""dpgather's PEP 517 build backend: setuptools' own, refusing to write into ``dist/``.

``dist/`` holds the sources of ``dpgather.dist`` (the communicators), yet ``dist/`` is where
``python -m build`` and ``setup.py sdist`` put their output by default. Every hook that writes
a file checks the folder first and stops with a one-line message naming ``--outdir wheelhouse``
(the Makefile's ``make wheel`` and pip use other folders and never meet the guard).
"""

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 - every hook not redefined below

__all__ = list(_setuptools.__all__)

#: The source folder a build must never write into (this file is build_backend/dpgather_build.py).
SOURCE_DIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dist")


class BuildIntoSourceFolder(SystemExit):
    """A build was asked to write into ``dist/``, a source folder of dpgather (a SystemExit: the
    build frontend shows the message alone, without a traceback)."""


def check_output_dir(directory):
    """Raise :class:`BuildIntoSourceFolder` when ``directory`` is ``dist/`` of this checkout or
    lies inside it."""
    target = os.path.realpath(directory)
    source = os.path.realpath(SOURCE_DIST)
    if target == source or target.startswith(source + os.sep):
        raise BuildIntoSourceFolder(
            f"dpgather: refusing to write build output into {directory}: dist/ is a source folder "
            "(dpgather.dist, the communicators); use `python -m build --outdir wheelhouse` or `make wheel`")


def build_sdist(sdist_directory, config_settings=None):
    check_output_dir(sdist_directory)
    return _setuptools.build_sdist(sdist_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    check_output_dir(wheel_directory)
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    check_output_dir(wheel_directory)
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    check_output_dir(metadata_directory)
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    check_output_dir(metadata_directory)
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)
