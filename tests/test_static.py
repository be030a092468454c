"""Static checks run by the test command: typing tests in typings/, mypy --strict over the
package and the tests, and ruff."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mypy import api as mypy_api

ROOT = Path(__file__).resolve().parent.parent
TYPINGS = ROOT / "typings"


# One cache for every mypy run of the module, so torch's stubs are read once. It lives under
# pytest's own temporary root (old runs' roots are pruned), never in the checkout.
_CACHE: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    cache = tmp_path_factory.mktemp("mypy-cache")
    _CACHE.append(str(cache))
    yield
    _CACHE.remove(str(cache))
    shutil.rmtree(cache, ignore_errors=True)


def _mypy(*args: str) -> tuple[str, int]:
    out, err, status = mypy_api.run([*args, "--cache-dir", _CACHE[-1]])
    return out + err, status


@pytest.mark.parametrize("kind", ["pass", "fail", "reveal"])
def test_typing_files(kind: str) -> None:
    """pass/ and reveal/ type-check cleanly; fail/'s errors all happen where the ignores say."""
    report, status = _mypy("--config-file", str(TYPINGS / "mypy.ini"), str(TYPINGS / kind))
    assert status == 0, report


@pytest.mark.parametrize("path", sorted(p.name for p in (TYPINGS / "fail").glob("*.py")))
def test_fail_files_really_fail_without_their_ignores(path: str, tmp_path: Path) -> None:
    """Strip the ignores: every marked line must then be an error."""
    src = (TYPINGS / "fail" / path).read_text()
    marked = sum("# type: ignore[" in line for line in src.splitlines())
    stripped = tmp_path / "stripped.py"
    stripped.write_text("\n".join(line.split("  # type: ignore[")[0] for line in src.splitlines()) + "\n")
    report, status = _mypy("--config-file", str(TYPINGS / "mypy.ini"), str(stripped))
    assert status == 1
    assert report.count(": error:") >= marked, report


@pytest.mark.parametrize(
    "path", sorted(f"{p.parent.name}/{p.name}" for k in ("pass", "reveal") for p in (TYPINGS / k).glob("*.py"))
)
def test_typing_examples_also_run(path: str) -> None:
    """The accepted and revealed examples are real calls: each file runs without error, so a
    type that only checks because the call is wrong cannot hide there."""
    result = subprocess.run(
        [sys.executable, "-W", "ignore", str(TYPINGS / path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_mypy_strict_over_package_and_tests() -> None:
    report, status = _mypy("--config-file", str(ROOT / "pyproject.toml"), str(ROOT / "funcloss"), str(ROOT / "tests"))
    assert status == 0, report


def test_ruff() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
