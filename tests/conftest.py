"""Test-wide settings.

``sofim_optax`` is imported before any test module runs JAX, so that its CPU
runtime work-arounds (``sofim_optax/_cpu_runtime.py``) apply to the whole suite.
"""

import sofim_optax  # noqa: F401
