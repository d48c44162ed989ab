"""Flax experiment scripts: data sets, models, the train loop, comparisons and benchmarks.

Importing this package imports :mod:`sofim_optax` first, so that its CPU
runtime work-arounds (``sofim_optax/_cpu_runtime.py``: XLA's CPU scheduler
flag and single-threaded OpenBLAS) are in place before any script starts JAX.
"""

import sofim_optax  # noqa: F401
