"""``make test``'s shards (tests/conftest.py, used by tests/parallel.py): every test lands in
exactly one process."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("suite_conftest", Path(__file__).with_name("conftest.py"))
conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conftest)


class _Item:
    def __init__(self, name, *marks):
        self.name, self.marks = name, set(marks)

    def get_closest_marker(self, mark):
        return mark if mark in self.marks else None


class _Config:
    class hook:  # noqa: N801 - pytest's attribute name
        @staticmethod
        def pytest_deselected(items):
            pass


ITEMS = [_Item("a"), _Item("sdist", "install"), _Item("gpu1", "gpu"), _Item("b"), _Item("venv", "install"),
         _Item("c")]


def _kept(shard, monkeypatch):
    monkeypatch.setenv("DPGATHER_TEST_SHARD", shard)
    items = list(ITEMS)
    conftest.pytest_collection_modifyitems(_Config, items)
    return [it.name for it in items]


def test_install_and_rest_partition_the_suite(monkeypatch):
    assert _kept("install", monkeypatch) == ["sdist", "venv"]
    assert _kept("rest", monkeypatch) == ["a", "gpu1", "b", "c"]  # the GPU tests run with the rest


def test_round_robin_shards_partition_the_cpu_tests(monkeypatch):
    # slices of the tests that need no GPU, install tests included (a GPU node has many cores)
    assert [_kept(f"{k}/2", monkeypatch) for k in range(2)] == [["a", "b", "c"], ["sdist", "venv"]]
    assert _kept("gpu", monkeypatch) == ["gpu1"]


def test_a_bad_shard_is_a_usage_error(monkeypatch):
    with pytest.raises(pytest.UsageError, match="DPGATHER_TEST_SHARD='half'"):
        _kept("half", monkeypatch)


def test_a_process_killed_by_a_signal_fails_the_run(monkeypatch, capsys):
    """A pytest process that dies by a signal (even after printing its summary) fails make test:
    a negative return code is a failure, not max(0, -11)."""
    import parallel

    class Killed:
        def __init__(self, *args, **kwargs):
            pass

        def poll(self):
            return -11

    monkeypatch.setattr(parallel.subprocess, "Popen", Killed)
    monkeypatch.setenv("DPGATHER_TEST_JOBS", "2")
    assert parallel.main([]) == 128 + 11
    out = capsys.readouterr().out
    assert "exited by signal 11 (SIGSEGV)" in out and "FAILED: shard0, shard1, gpu" in out
