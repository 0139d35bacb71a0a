"""Shared fixtures. Tests run on the CPU; float64 is switched on per test where precision matters."""

import jax
import pytest

# A context manager in recent jax; older releases keep it under jax.experimental.
_enable_x64 = getattr(jax, "enable_x64", None)
if _enable_x64 is None:  # pragma: no cover - depends on the installed jax
    from jax.experimental import enable_x64 as _enable_x64


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled (restored afterwards)."""
    with _enable_x64(True):
        yield
