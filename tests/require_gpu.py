"""A pytest plugin, loaded by tests/conftest.py: under DWOPS_REQUIRE_GPU=1 (set by
scripts/gpu_check.sh) a skipped GPU test is a failure, so a check on a GPU machine cannot pass by
skipping (a missing package such as numba-cuda, a device not seen). GPU tests are those marked
``gpu``, and every module of a file that marks them (a module-level skip happens before its marks
are read). Other skips stay skips. Kept free of imports beyond pytest so that it loads alone."""

from __future__ import annotations

import os

import pytest

REQUIRE_GPU = os.environ.get("DWOPS_REQUIRE_GPU") == "1"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (REQUIRE_GPU and report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("gpu") is not None):
        report.outcome = "failed"
        report.longrepr = f"GPU test skipped under DWOPS_REQUIRE_GPU=1: {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_GPU and report.skipped and isinstance(collector, pytest.Module):
        try:
            gpu_file = "pytest.mark.gpu" in collector.path.read_text()
        except OSError:
            gpu_file = False
        if gpu_file:
            report.outcome = "failed"
            report.longrepr = (f"GPU test module skipped under DWOPS_REQUIRE_GPU=1: "
                               f"{_skip_reason(report)}")
