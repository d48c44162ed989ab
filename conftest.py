"""Settings for the doctests of the library (`make doctest`: `pytest --doctest-modules sofim_optax`).

The docstring examples run JAX, so the CPU runtime settings (``sofim_optax.cpu_runtime``) are
applied before any of them, as ``tests/conftest.py`` does for the test suite. Every module of
the package imports with the library's own dependencies (jax, optax, flax, chex, numpy), so
none needs to be skipped.
"""

import sofim_optax

sofim_optax.configure_cpu_runtime()  # before the first JAX computation
