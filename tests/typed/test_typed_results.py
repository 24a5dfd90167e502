"""mypy over a typed caller (``typed_results.py``): ``@fifo`` on ``def f(...) -> R`` (or
``async def``) makes a ``FifoFunction[P, R]`` whose handles are ``TaskHandle[R]``, so
``result()`` is an ``R``; and a wrong use is an error mypy reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def _mypy(path: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--python-version", "3.11", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, cwd=HERE.parent.parent, timeout=300)


def test_results_are_typed_by_what_the_function_returns() -> None:
    run = _mypy(HERE / "typed_results.py")
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_result_used_as_the_wrong_type_is_reported(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "from pyfiq import fifo\n"
        "@fifo(queue='typed', store_result=True)\n"
        "def total(x: int) -> float:\n"
        "    return x / 2\n"
        "def caller() -> str:\n"
        "    return total.send_with_options(args=(1,)).result()\n"
    )
    run = _mypy(wrong)
    assert run.returncode == 1 and 'Incompatible return value type (got "float", expected "str")' in run.stdout, (
        run.stdout
    )
