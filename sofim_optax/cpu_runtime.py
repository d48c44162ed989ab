"""Settings that protect curvature methods from problems of JAX's CPU runtime.

Call :func:`configure_cpu_runtime` once, at the start of a program that runs on CPU, before
the first JAX computation (XLA and OpenBLAS read the settings when they start)::

    import sofim_optax
    sofim_optax.configure_cpu_runtime()

Importing ``sofim_optax`` changes nothing by itself. When a layer-wise method first traces a
decomposition on CPU with jaxlib older than 0.11 and the scheduler setting below is not in
``XLA_FLAGS``, one warning (logger ``"sofim_optax"``) says so and how to fix it. The problems:

1. **A deadlock in XLA's CPU scheduler.** With jax/jaxlib 0.10.2, a jitted KFAC update of a
   deep autoencoder (784-256-128-64-16-…, one preconditioned layer suffices) can never finish
   on CPU: every thread waits on a futex and the CPU sits idle. Turning off XLA's
   concurrency-optimised scheduler (``--xla_cpu_enable_concurrency_optimized_scheduler=false``)
   makes the same program finish in seconds. :func:`configure_cpu_runtime` appends that flag
   to ``XLA_FLAGS`` unless the variable already mentions the flag (then the user decided). It
   only affects the CPU backend, and only if JAX's backends have not started yet.
2. **Oversubscribed LAPACK.** JAX runs ``eigh``/``cholesky`` on CPU through scipy's OpenBLAS,
   whose own thread pool competes with XLA's: an ``eigh`` of a 785×785 matrix took about 6 s
   instead of 0.2–0.6 s on a 2-core machine. :func:`configure_cpu_runtime` defaults
   ``OPENBLAS_NUM_THREADS`` to 1 if scipy has not been loaded yet (OpenBLAS reads it when it
   loads). This also makes the program's own scipy BLAS calls single-threaded; set the
   variable yourself to choose otherwise.
3. **Batched LAPACK calls that wait on XLA's thread pool.** jaxlib 0.10's CPU kernels for a
   *batched* ``eigh``/``cholesky``/``inv`` split the batch over XLA's intra-op thread pool and
   block until the pieces are done; when every pool thread is inside such a call, nothing runs
   the pieces and the process hangs. :func:`map_stack`, which every method uses to decompose a
   stack of blocks, is therefore ``jax.vmap`` normally and ``lax.map`` (one matrix per LAPACK
   call) on CPU with jaxlib older than 0.11: same results, no hang. This one needs no call;
   ``SOFIM_OPTAX_NO_CPU_WORKAROUNDS=1`` turns it (and the warning) off.
4. **A copy of the curvature state on every step.** Statistics and refreshes run under
   ``lax.cond`` on their periods. On a step where a branch is not taken, XLA's CPU compiler
   still copies the stacks that the branch passes through unchanged (its default copy
   insertion cannot prove the copy unneeded when the stack is also an operand of the other
   branch): for Mini-Block Fisher on the benchmarks' small CNN, two 100 MB copies per step,
   most of the step time at amortised periods. XLA's region analysis
   (``--xla_cpu_copy_insertion_use_region_analysis=true``) proves it and drops the copies;
   :func:`configure_cpu_runtime` appends that flag too, under the same rule as the
   scheduler's. It costs compile time (about 13% more on the test suite's tiny programs,
   which therefore opts out with ``...=false``). On GPU the same option is
   ``--xla_gpu_copy_insertion_use_region_analysis`` (not set by this function).
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = [
    "configure_cpu_runtime",
    "map_stack",
    "sequential_decompositions",
    "SCHEDULER_FLAG",
    "COPY_FLAG",
]

logger = logging.getLogger("sofim_optax")

OPT_OUT_VARIABLE = "SOFIM_OPTAX_NO_CPU_WORKAROUNDS"
SCHEDULER_FLAG_NAME = "xla_cpu_enable_concurrency_optimized_scheduler"
SCHEDULER_FLAG = f"--{SCHEDULER_FLAG_NAME}=false"
COPY_FLAG_NAME = "xla_cpu_copy_insertion_use_region_analysis"
COPY_FLAG = f"--{COPY_FLAG_NAME}=true"

_warned = [False]


def _opted_out() -> bool:
    return os.environ.get(OPT_OUT_VARIABLE, "").strip() not in ("", "0")


def _old_jaxlib_on_cpu() -> bool:
    import jax
    import jaxlib.version

    old = tuple(int(v) for v in jaxlib.version.__version__.split(".")[:2]) < (0, 11)
    return old and jax.default_backend() == "cpu"


def configure_cpu_runtime() -> None:
    """Applies settings 1, 2 and 4 of this module, unless the user already chose them.

    Call it before the first JAX computation of the process (for a script: right after the
    imports). It sets ``XLA_FLAGS`` and ``OPENBLAS_NUM_THREADS`` in ``os.environ`` only; on
    other backends the settings are harmless. Calling it again does nothing more.
    """
    if "scipy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    for name, flag in ((SCHEDULER_FLAG_NAME, SCHEDULER_FLAG), (COPY_FLAG_NAME, COPY_FLAG)):
        flags = os.environ.get("XLA_FLAGS", "")
        if name not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def sequential_decompositions() -> bool:
    """Whether :func:`map_stack` decomposes stacks one matrix at a time (problem 3)."""
    return not _opted_out() and _old_jaxlib_on_cpu()


def _warn_if_risky() -> None:
    if _warned[0] or _opted_out() or not _old_jaxlib_on_cpu():
        return
    _warned[0] = True
    if SCHEDULER_FLAG_NAME not in os.environ.get("XLA_FLAGS", ""):
        logger.warning(
            "sofim_optax: XLA's concurrency-optimised CPU scheduler is on; with jaxlib < 0.11 "
            "it can deadlock on curvature updates of larger models. Call "
            "sofim_optax.configure_cpu_runtime() before the first JAX computation, or start "
            "Python with XLA_FLAGS=%s.",
            SCHEDULER_FLAG,
        )


def map_stack(fn, *stacks):
    """``jax.vmap(fn)(*stacks)``, or ``lax.map`` over the leading axis where batched LAPACK
    calls can deadlock (problem 3). Use it for decompositions of stacked blocks."""
    import jax

    _warn_if_risky()
    if sequential_decompositions():
        return jax.lax.map(lambda args: fn(*args), stacks)
    return jax.vmap(fn)(*stacks)
