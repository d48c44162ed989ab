"""Test-wide settings.

``sofim_optax.configure_cpu_runtime()`` runs before any test module runs JAX, so that the CPU
runtime settings (``sofim_optax/cpu_runtime.py``) apply to the whole suite. The ``x64``
fixture is shared by every test that compares against a float64 reference.
"""

import sofim_optax

sofim_optax.configure_cpu_runtime()  # before the first JAX computation

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Runs a test with float64 enabled (the dense references are float64)."""
    with jax.enable_x64(True):
        yield
