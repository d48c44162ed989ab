"""Test-wide settings.

``sofim_optax.configure_cpu_runtime()`` runs before any test module runs JAX, so that the CPU
runtime settings (``sofim_optax/cpu_runtime.py``) apply to the whole suite. The ``x64``
fixture is shared by every test that compares against a float64 reference.
"""

import os

import sofim_optax

# The suite compiles thousands of tiny programs once each: XLA's region analysis for copy
# insertion (which configure_cpu_runtime turns on, to save copies at run time) costs about
# 13% more compile time and saves nothing here, so the suite keeps XLA's default.
# tests/test_cpu_runtime.py checks the setting itself, in fresh interpreters.
#
# Two more XLA:CPU settings cut the suite's compile time by about three: the legacy elemental
# emitter for fusions instead of the MLIR fusion emitters (the kernels it makes are the same
# arithmetic, a little slower to run, which these tiny programs never notice), and one LLVM
# module per program instead of several compiled in parallel (the suite's two workers already
# fill both cores). SOFIM_OPTAX_TEST_OPTIMIZE=1 (below) compiles with XLA's defaults instead.
_TEST_FLAGS = {"xla_cpu_copy_insertion_use_region_analysis": "false"}
# Eight simulated CPU devices, for tests/test_sharding.py (the other tests use the first).
_TEST_FLAGS["xla_force_host_platform_device_count"] = "8"
if os.environ.get("SOFIM_OPTAX_TEST_OPTIMIZE", "") != "1":
    _TEST_FLAGS["xla_cpu_use_fusion_emitters"] = "false"
    _TEST_FLAGS["xla_cpu_parallel_codegen_split_count"] = "1"
for _name, _value in _TEST_FLAGS.items():
    if _name not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_name}={_value}".strip()
sofim_optax.configure_cpu_runtime()  # before the first JAX computation

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same programs (the same optimizer on the same tiny model, in several
# tests and in both xdist workers). JAX's persistent compilation cache lets every program be
# compiled once per run; it changes no result. Set SOFIM_OPTAX_TEST_JAX_CACHE to "" to turn
# it off.
_CACHE = os.environ.get(
    "SOFIM_OPTAX_TEST_JAX_CACHE", str(pathlib.Path(__file__).resolve().parents[1] / ".jax_cache")
)
if _CACHE:
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# The suite runs thousands of tiny programs once each, so XLA's optimisation passes cost more
# than they save (about a third of each compile). Results are unchanged up to round-off, and
# every comparison in the suite is within one configuration or against a reference with a
# tolerance. Set SOFIM_OPTAX_TEST_OPTIMIZE=1 to compile as in production.
if os.environ.get("SOFIM_OPTAX_TEST_OPTIMIZE", "") != "1":
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture
def x64():
    """Runs a test with float64 enabled (the dense references are float64)."""
    with jax.enable_x64(True):
        yield
