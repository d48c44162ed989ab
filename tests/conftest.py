"""Test-wide settings.

``sofim_optax`` is imported before any test module runs JAX, so that its CPU
runtime work-arounds (``sofim_optax/_cpu_runtime.py``) apply to the whole suite. The
``x64`` fixture is shared by every test that compares against a float64 reference.
"""

import sofim_optax  # noqa: F401  (first: it configures JAX's CPU runtime)

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Runs a test with float64 enabled (the dense references are float64)."""
    with jax.enable_x64(True):
        yield
