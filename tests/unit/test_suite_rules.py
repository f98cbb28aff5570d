"""The suite's own rules: under CI a skipped test fails the run (hack/no_skips.py on pytest's JUnit
report), a `benchmarks` test without the files skips outside CI and fails under it, no test
importorskips a required dependency, and every test is either `unit` or `integration`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import tests.conftest as suite_conftest

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ("torch", "transformers", "trl", "deepspeed", "datasets", "kopf", "kubernetes", "minio")


def run_pytest(folder: Path, source: str) -> tuple[int, Path]:
    """pytest on one file outside this suite (its own rootdir, none of our conftest), with a JUnit report."""
    (folder / "test_sample.py").write_text(source, encoding="utf-8")
    (folder / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    junit = folder / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                           str(folder / "test_sample.py")], cwd=folder, capture_output=True, text=True, timeout=120)
    return proc.returncode, junit


def no_skips(junit: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "hack" / "no_skips.py"), str(junit)],
                          capture_output=True, text=True, timeout=60)


def test_a_skipped_test_fails_the_ci_check_by_name(tmp_path: Path) -> None:
    rc, junit = run_pytest(tmp_path, "import pytest\n\ndef test_ran():\n    assert True\n\n"
                                     "def test_hidden():\n    pytest.skip('no GPU')\n")
    assert rc == 0  # plain pytest is green with a skip: the reason the check exists
    check = no_skips(junit)
    assert check.returncode == 1, check.stderr
    assert "1 skipped" in check.stderr and "test_sample::test_hidden: no GPU" in check.stderr


def test_a_run_with_no_skips_passes_the_ci_check(tmp_path: Path) -> None:
    rc, junit = run_pytest(tmp_path, "def test_ran():\n    assert 1 + 1 == 2\n")
    check = no_skips(junit)
    assert (rc, check.returncode) == (0, 0) and "0 skipped" in check.stderr


def test_the_ci_check_is_wired_into_hack_test_sh() -> None:
    script = (REPO / "hack" / "test.sh").read_text()
    # every pytest run writes its report into $results, and under CI each report goes through the check
    assert script.count("-m pytest") == 1 and '--junitxml="$results/$name.xml"' in script
    assert 'for report in "$results"/*.xml; do' in script and 'hack/no_skips.py" "$report"' in script


class _Item:
    def __init__(self, *markers: str) -> None:
        self.markers = set(markers)

    def get_closest_marker(self, name: str):
        return name if name in self.markers else None


def test_benchmark_tests_skip_without_the_files_and_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(suite_conftest, "BENCHMARKS", None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="DHAD_BENCHMARKS"):
        suite_conftest.pytest_runtest_setup(_Item("benchmarks"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI runs every test"):
        suite_conftest.pytest_runtest_setup(_Item("benchmarks"))
    suite_conftest.pytest_runtest_setup(_Item("unit"))  # other tests are not touched
    monkeypatch.setattr(suite_conftest, "BENCHMARKS", REPO)
    suite_conftest.pytest_runtest_setup(_Item("benchmarks"))  # files there: the test runs


def test_required_dependencies_are_imported_plainly() -> None:
    pattern = re.compile(r"importorskip\(\s*['\"](" + "|".join(REQUIRED) + r")['\"]")
    offenders = [str(p.relative_to(REPO)) for folder in ("tests", "bench") for p in (REPO / folder).rglob("*.py")
                 if p.name != Path(__file__).name and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_every_collected_test_is_unit_or_integration(request: pytest.FixtureRequest) -> None:
    items = request.session.items
    assert items and all(bool(i.get_closest_marker("unit")) != bool(i.get_closest_marker("integration")) for i in items)
    assert request.node.get_closest_marker("unit") is not None
