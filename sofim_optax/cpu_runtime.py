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
5. **Fresh memory pages on every step.** XLA's CPU runtime allocates each run's temporaries
   with ``malloc`` and frees them at the end. The allocation is sized for the largest branch
   of the program, so a curvature method's step (whose refresh branch needs large
   temporaries) asks for tens or hundreds of megabytes even on the steps where that branch
   is not taken. glibc serves requests above its mmap threshold (at most 32 MB) with fresh
   pages from the kernel and returns them at ``free``, so every step page-faults and
   zero-fills the memory it touches: on the benchmarks' small CNN, Mini-Block Fisher took
   about 4 800 page faults per step, a third of its step time (33 ms against SGD-momentum's
   17 ms; 25 ms without the faults). :func:`configure_cpu_runtime` therefore asks glibc
   (``mallopt``) to serve every allocation from one reusable heap (``M_MMAP_MAX=0``,
   ``M_ARENA_MAX=1``) and to keep freed memory instead of trimming it
   (``M_TRIM_THRESHOLD`` at its maximum), so the next step reuses the same pages. The cost:
   the process keeps its peak memory until it exits. It is skipped where the C library is not
   glibc, and when any ``MALLOC_*`` variable or a ``glibc.malloc`` tunable in
   ``GLIBC_TUNABLES`` is set (then the user decided); it acts at once, for the whole process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

__all__ = [
    "configure_cpu_runtime",
    "keep_freed_memory",
    "on_glibc",
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


#: glibc's ``mallopt`` parameters (``malloc.h``) and the values of problem 5.
_MALLOPT_SETTINGS = (
    ("M_MMAP_MAX", -4, 0),
    ("M_ARENA_MAX", -8, 1),
    ("M_TRIM_THRESHOLD", -1, 2**31 - 1),
)


def _user_chose_malloc() -> bool:
    return any(k.startswith("MALLOC_") for k in os.environ) or (
        "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    )


def on_glibc() -> bool:
    """Whether this process runs on Linux with glibc (where problem 5 applies)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Problem 5: glibc serves every allocation from one heap and keeps freed memory.

    Returns whether the settings were applied (``False`` on a C library other than glibc, or
    when the user set ``MALLOC_*`` variables or ``glibc.malloc`` tunables). Called by
    :func:`configure_cpu_runtime`; it can be called on its own at any time.
    """
    if _user_chose_malloc() or not on_glibc():
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's own C library
    if mallopt is None:
        return False
    return all(mallopt(code, value) == 1 for _, code, value in _MALLOPT_SETTINGS)


def configure_cpu_runtime() -> None:
    """Applies settings 1, 2, 4 and 5 of this module, unless the user already chose them.

    Call it before the first JAX computation of the process (for a script: right after the
    imports). It sets ``XLA_FLAGS`` and ``OPENBLAS_NUM_THREADS`` in ``os.environ`` and glibc's
    allocator settings (:func:`keep_freed_memory`); on other backends the settings are
    harmless. Calling it again does nothing more.
    """
    keep_freed_memory()
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
