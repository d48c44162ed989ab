"""The benchmark scripts, each run as ``python -m experiments.benchmarks.<name>``.

* ``kfac``: capture cost, KFAC's step time over SGD-momentum's, and training side by side
  with kfac-jax (``kfac_cost``, ``kfac_jax_env``, ``kfac_report``, ``kfac_jax_runner``);
* ``kpsvd``: the KPSVD family on the Fashion-MNIST autoencoder;
* ``mbf``: Mini-Block Fisher's step time, state size and a CNN convergence race;
* ``kbfgs``: K-BFGS and K-BFGS(L) against KFAC and Adam on the deep autoencoder;
* ``step_time``: SOFIM's per-step time against SGD-momentum's.

Shared: ``problems`` (models, losses, the jitted train step, training runs), ``curves``
(trailing means, tables, JSON), and :mod:`experiments.timing` (interleaved timing).
"""
