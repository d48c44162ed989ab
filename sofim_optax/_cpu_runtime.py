"""Work-arounds for two problems of JAX's CPU runtime that curvature methods hit.

Applied once, when ``sofim_optax`` is imported; set the environment variable
``SOFIM_OPTAX_NO_CPU_WORKAROUNDS=1`` to leave everything as it is.

1. **A deadlock in XLA's CPU scheduler.** With jax/jaxlib 0.10.2, a jitted
   KFAC update of a deep autoencoder (784-256-128-64-16-…, one preconditioned
   layer suffices) never finishes on CPU: every thread waits on a futex and
   the CPU sits idle. Small models run. Turning off XLA's
   concurrency-optimised scheduler (``--xla_cpu_enable_concurrency_optimized_scheduler=false``)
   makes the same program finish in seconds. We append that flag to
   ``XLA_FLAGS`` when JAX's backends are not yet initialised (XLA reads the
   variable then). If they already are, we cannot change it and log a warning
   on CPU saying how to set it. The flag only affects the CPU backend.
2. **Oversubscribed LAPACK.** JAX runs ``eigh``/``cholesky`` on CPU through
   scipy's OpenBLAS, whose own thread pool competes with XLA's: an ``eigh`` of
   a 785×785 matrix took about 6 s instead of 0.2–0.6 s on a 2-core machine.
   We default ``OPENBLAS_NUM_THREADS`` to 1 if scipy has not been loaded yet
   (OpenBLAS reads it when it loads). This also makes the user's own scipy
   BLAS calls single-threaded; set the variable yourself to choose otherwise.
3. **Batched LAPACK calls that wait on XLA's thread pool.** jaxlib 0.10's
   CPU kernels for a *batched* ``eigh``/``cholesky``/``inv`` (a ``vmap``-ed
   decomposition) split the batch over XLA's intra-op thread pool and block
   until the pieces are done; when every pool thread (two on a 2-core machine)
   is inside such a call, nothing runs the pieces and the process hangs with
   the CPU idle. It happens now and then on a full-size KFAC autoencoder step
   even with (1). :func:`map_stack` is what every method uses to decompose a
   stack of blocks: ``jax.vmap`` normally, ``lax.map`` (one matrix per LAPACK
   call, which never waits on the pool) on CPU with jaxlib older than 0.11.
   Same results; the opt-out variable turns it off too.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("sofim_optax")

OPT_OUT_VARIABLE = "SOFIM_OPTAX_NO_CPU_WORKAROUNDS"
SCHEDULER_FLAG_NAME = "xla_cpu_enable_concurrency_optimized_scheduler"
SCHEDULER_FLAG = f"--{SCHEDULER_FLAG_NAME}=false"


def _sequential_decompositions() -> bool:
    if os.environ.get(OPT_OUT_VARIABLE, "").strip() not in ("", "0"):
        return False
    import jax
    import jaxlib.version

    old = tuple(int(v) for v in jaxlib.version.__version__.split(".")[:2]) < (0, 11)
    return old and jax.default_backend() == "cpu"


def map_stack(fn, *stacks):
    """``jax.vmap(fn)(*stacks)``, or ``lax.map`` over the leading axis where batched LAPACK
    calls can deadlock (see 3. above). Use it for decompositions of stacked blocks."""
    import jax

    if _sequential_decompositions():
        return jax.lax.map(lambda args: fn(*args), stacks)
    return jax.vmap(fn)(*stacks)


def configure() -> None:
    """Applies the two work-arounds above unless the user opted out or set them already."""
    if os.environ.get(OPT_OUT_VARIABLE, "").strip() not in ("", "0"):
        return
    if "scipy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

    flags = os.environ.get("XLA_FLAGS", "")
    if SCHEDULER_FLAG_NAME in flags:
        return  # the user decided
    from jax._src import xla_bridge  # private, but the only way to ask this

    if not xla_bridge.backends_are_initialized():
        os.environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}".strip()
        return
    import jax

    if jax.default_backend() == "cpu":
        logger.warning(
            "JAX's CPU backend was initialised before sofim_optax was imported, so XLA's "
            "concurrency-optimised CPU scheduler stays on; with jax 0.10 it can deadlock on "
            "curvature updates of larger models. Import sofim_optax before running any JAX "
            "computation, or start Python with XLA_FLAGS=%s.",
            SCHEDULER_FLAG,
        )
