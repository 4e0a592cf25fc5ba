"""A non-editable install exposes memzoo.* only, and imports from any directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_imports_from_another_directory(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    installed = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert installed == ["bin", "memzoo"], installed  # no bare optim/, reference/, triton_kernels/, bench/
    assert sorted(p.name for p in (target / "memzoo").iterdir() if p.is_dir() and p.name != "__pycache__") == [
        "bench", "optim", "reference", "triton_kernels"]
    assert (target / "bin" / "memzoo-bench").exists()
    metadata = next(target.glob("memzoo-*.dist-info")).joinpath("METADATA").read_text()
    assert "Requires-Dist: triton>=3.0; sys_platform == \"linux\"" in metadata
    assert "Requires-Dist: bitsandbytes" in metadata and "Requires-Dist: einops" in metadata

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = (
        "import memzoo, memzoo.optim, memzoo.bench.cli\n"
        "from memzoo.optim import Lion\n"
        "import torch\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "Lion([p], backend='torch').step()  # the torch backend's subpackage is installed\n"
        "print(memzoo.__file__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(target)), result.stdout
    help_text = subprocess.run([sys.executable, "-m", "memzoo.bench", "--help"], cwd=elsewhere, env=env,
                               capture_output=True, text=True, timeout=300)
    assert help_text.returncode == 0 and "kernels" in help_text.stdout and "step" in help_text.stdout



def test_the_run_says_which_comparisons_with_the_official_code_it_skipped() -> None:
    """A missing official package shows as one `s` among hundreds of dots: the run's summary
    (tests/conftest.py) names it and the command that installs the oracles."""
    import conftest
    from support import official_package

    with pytest.raises(pytest.skip.Exception) as skipped:
        official_package("no_such_official_package")
    report = SimpleNamespace(longrepr=("test_x.py", 1, f"Skipped: {skipped.value.msg}"))
    other = SimpleNamespace(longrepr=("test_y.py", 2, "Skipped: needs a CUDA device"))
    lines: list[str] = []
    reporter = SimpleNamespace(stats={"skipped": [report, report, other]},
                               write_sep=lambda sep, title, **kwargs: lines.append(title),
                               write_line=lines.append)
    conftest.pytest_terminal_summary(reporter, 0, None)
    assert lines == ["comparisons with the official code skipped",
                     "2 tests skipped: no_such_official_package is not installed",
                     "run them after: pip install --no-deps -r tests/oracles.txt"]
    # Every official package is pinned to the version the trajectory tests were written against.
    pins = [line for line in (ROOT / "tests" / "oracles.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9.]*", pin) for pin in pins), pins
