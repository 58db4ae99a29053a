"""Benchmark files are named ``bench_*.py``, so that ``pytest`` on ``tests/`` (the default
``testpaths``) never runs them and ``python -m pytest benches --benchmark-only`` finds them all."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    # A file named on the command line is collected by pytest itself; do not collect it twice.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
