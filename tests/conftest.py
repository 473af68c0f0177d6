"""Suite-wide hooks: ``DPGATHER_TEST_SHARD`` selects one shard of the suite (tests/parallel.py).

``DPGATHER_TEST_SHARD=k/N`` keeps the k-th of N round-robin slices of the tests that need no GPU;
``DPGATHER_TEST_SHARD=gpu`` keeps only the GPU tests (``@pytest.mark.gpu``), which always run in
one process of their own so that two GPU jobs never share the GPUs. ``install`` keeps only the
tests that build or install the package (``@pytest.mark.install``), ``rest`` every other test.
Unset: every test.
"""

import os

import pytest


def _is_gpu(item):
    return item.get_closest_marker("gpu") is not None


def _is_install(item):
    return item.get_closest_marker("install") is not None


def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("DPGATHER_TEST_SHARD", "").strip()
    if not shard:
        return
    if shard == "gpu":
        keep = [it for it in items if _is_gpu(it)]
    elif shard in ("install", "rest"):
        keep = [it for it in items if _is_install(it) == (shard == "install")]
    else:
        try:
            k, n = (int(v) for v in shard.split("/"))
            assert 0 <= k < n
        except (ValueError, AssertionError):
            raise pytest.UsageError(f"DPGATHER_TEST_SHARD={shard!r}: expected 'gpu', 'install', 'rest' "
                                    "or 'k/N' with 0 <= k < N")
        cpu = [it for it in items if not _is_gpu(it)]
        keep = cpu[k::n]
    drop = [it for it in items if it not in set(keep)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
