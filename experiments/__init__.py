"""Flax experiment scripts: data sets, models, the train loop, comparisons and benchmarks.

* ``python -m experiments.compare``: the quick main job (every installed method, Fashion-MNIST);
* ``python -m experiments.classify`` / ``python -m experiments.autoencoder``: the two protocols;
* ``registry`` (the optimizers and what their steps need), ``step`` (the one train step
  builder), ``loop`` (the training loop), ``tasks``, ``checkpoint``, ``harness`` (the shared
  CLI), ``reporting`` (JSON, plots, tables), ``datasets``, ``models``, ``tune``, ``peers``;
* ``benchmarks``: the benchmark scripts (``python -m experiments.benchmarks.kfac`` etc.),
  sharing ``timing`` (interleaved per-step timing).

Importing this package calls :func:`sofim_optax.configure_cpu_runtime` first, so that
the CPU runtime settings (``sofim_optax/cpu_runtime.py``: XLA's CPU scheduler flag and
single-threaded OpenBLAS) are in place before any script starts JAX.
"""

import sofim_optax

sofim_optax.configure_cpu_runtime()
