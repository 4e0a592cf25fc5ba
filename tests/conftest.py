"""Test configuration. Without CUDA, Triton kernels run on CPU tensors through Triton's
interpreter, which must be switched on before any kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("thorough", parent=settings.get_profile("default"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Where Triton kernels run in this session: compiled on CUDA, else interpreted on CPU tensors.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say at the end of the run which comparisons with the official code were skipped, and how
    to run them (a skip alone shows as one `s` among hundreds of dots)."""
    from support import ORACLE_INSTALL, ORACLE_SKIP

    missing: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if ORACLE_SKIP in reason:
            module = reason.split(ORACLE_SKIP, 1)[1].split()[0]
            missing[module] = missing.get(module, 0) + 1
    if missing:
        terminalreporter.write_sep("=", "comparisons with the official code skipped", yellow=True)
        for module, count in sorted(missing.items()):
            terminalreporter.write_line(f"{count} tests skipped: {module} is not installed")
        terminalreporter.write_line(f"run them after: {ORACLE_INSTALL}")
