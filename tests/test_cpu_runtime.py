"""The CPU runtime settings of ``sofim_optax.configure_cpu_runtime`` (see sofim_optax/cpu_runtime.py).

Each case runs in a fresh interpreter: the settings only take effect before
JAX's backend starts, which in this test process has long happened.
"""

import os
import subprocess
import sys

import pytest

from sofim_optax import cpu_runtime

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
COPY_FLAG = "--xla_cpu_copy_insertion_use_region_analysis=true"


def run_python(code: str, **env_overrides: str) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "OPENBLAS_NUM_THREADS", "SOFIM_OPTAX_NO_CPU_WORKAROUNDS")
        and not k.startswith("MALLOC_")  # (the allocator settings the cases choose)
    }
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


REPORT = (
    "import os, sofim_optax; {call}print(repr(os.environ.get('XLA_FLAGS'))); "
    "print(repr(os.environ.get('OPENBLAS_NUM_THREADS')))"
)
CONFIGURE = "sofim_optax.configure_cpu_runtime(); "


def test_import_alone_changes_nothing():
    out = run_python(REPORT.format(call=""))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == ["None", "None"]


def test_configure_sets_scheduler_flag_and_single_threaded_openblas():
    out = run_python(REPORT.format(call=CONFIGURE))
    assert out.returncode == 0, out.stderr
    flags, threads = out.stdout.strip().splitlines()
    assert FLAG in flags and COPY_FLAG in flags
    assert threads == "'1'"


@pytest.mark.slow  # (one of the suite's slowest, 5-11 s; make test-slow)
def test_existing_flags_are_kept_and_user_choices_respected():
    out = run_python(
        REPORT.format(call=CONFIGURE),
        XLA_FLAGS="--xla_cpu_use_xnnpack=true",
        OPENBLAS_NUM_THREADS="2",
    )
    flags, threads = out.stdout.strip().splitlines()
    assert "--xla_cpu_use_xnnpack=true" in flags and FLAG in flags
    assert threads == "'2'"
    out = run_python(
        REPORT.format(call=CONFIGURE),
        XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=true",
    )
    assert (
        out.stdout.strip().splitlines()[0]
        == f"'--xla_cpu_enable_concurrency_optimized_scheduler=true {COPY_FLAG}'"
    )
    out = run_python(
        REPORT.format(call=CONFIGURE),
        XLA_FLAGS="--xla_cpu_copy_insertion_use_region_analysis=false",
    )
    assert out.stdout.strip().splitlines()[0] == (
        f"'--xla_cpu_copy_insertion_use_region_analysis=false {FLAG}'"
    )
    # Calling it twice adds nothing more.
    out = run_python(REPORT.format(call=CONFIGURE + CONFIGURE))
    first = out.stdout.strip().splitlines()[0]
    assert first.count(FLAG) == 1 and first.count(COPY_FLAG) == 1


DECOMPOSE = """
import jax.numpy as jnp, sofim_optax
{call}
from sofim_optax import cpu_runtime
cpu_runtime.map_stack(jnp.linalg.cholesky, jnp.eye(3)[None])
cpu_runtime.map_stack(jnp.linalg.cholesky, jnp.eye(3)[None])
"""


def test_coexists_with_simulated_devices():
    """The settings keep a user's device-count flag: 8 simulated devices, each running
    a refresh split over a mesh of all 8 with the runtime's own flags in effect."""
    code = (
        "import os, jax, jax.numpy as jnp, sofim_optax; sofim_optax.configure_cpu_runtime(); "
        "from sofim_optax import distributed; "
        "mesh = jax.make_mesh((8,), ('data',)); "
        "x = {'a': jnp.stack([jnp.eye(4) * (i + 1) for i in range(8)])}; "
        "f = jax.jit(lambda s: distributed.map_stacks(jnp.linalg.eigvalsh, s)); "
        "ctx = jax.set_mesh(mesh); ctx.__enter__(); "
        "print(jax.device_count(), float(f(x)['a'].sum())); print(os.environ['XLA_FLAGS'])"
    )
    out = run_python(code, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert out.returncode == 0, out.stderr
    count, flags = out.stdout.strip().splitlines()
    assert count == "8 144.0"  # 4 · (1 + … + 8)
    assert "--xla_force_host_platform_device_count=8" in flags and FLAG in flags


@pytest.mark.slow  # (one of the suite's slowest, 5-11 s; make test-slow)
def test_warns_once_when_a_decomposition_runs_without_the_settings():
    import jax
    import jaxlib.version

    old_cpu = jax.default_backend() == "cpu" and tuple(
        int(v) for v in jaxlib.version.__version__.split(".")[:2]
    ) < (0, 11)
    out = run_python(DECOMPOSE.format(call=""))
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("sofim_optax.configure_cpu_runtime()") == (1 if old_cpu else 0)
    out = run_python(DECOMPOSE.format(call="sofim_optax.configure_cpu_runtime()"))
    assert "configure_cpu_runtime" not in out.stderr
    out = run_python(DECOMPOSE.format(call=""), SOFIM_OPTAX_NO_CPU_WORKAROUNDS="1")
    assert "configure_cpu_runtime" not in out.stderr


def test_library_uses_no_private_jax_or_optax_modules():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "sofim_optax"
    offenders = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "jax._src" in path.read_text() or "optax._src" in path.read_text()
    ]
    assert offenders == []


@pytest.mark.slow
def test_kfac_update_of_a_deep_autoencoder_finishes():
    # Regression test for the scheduler deadlock: this exact program never
    # finished with jax 0.10.2 on CPU without the flag.
    code = """
import sofim_optax
sofim_optax.configure_cpu_runtime()
import jax, jax.numpy as jnp, numpy as np, optax
from flax import linen as nn
class AE(nn.Module):
    @nn.compact
    def __call__(self, x):
        widths = [256, 128, 64, 16, 64, 128, 256, 784]
        for i, w in enumerate(widths):
            x = nn.Dense(w)(x)
            if i not in (3, 7):
                x = nn.relu(x)
        return x
x = np.random.default_rng(0).random((100, 784)).astype(np.float32)
model = AE(); params = model.init(jax.random.PRNGKey(0), x[:1])
loss = lambda p, xb: jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(model.apply(p, xb), xb), -1))
tx = sofim_optax.scale_by_kfac(damping=1.0)
@jax.jit
def step(p, s, xb):
    l, g, st = sofim_optax.curvature.linen.value_grad_and_stats(loss, p, xb)
    return tx.update(g, s, p, layer_stats=st)
u, s = step(params, tx.init(params), x)
jax.block_until_ready(u)
print("finished")
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "finished" in out.stdout


def test_map_stack_matches_vmap_and_is_sequential_on_old_cpu_jaxlib(monkeypatch):
    import jax
    import jax.numpy as jnp
    import jaxlib.version
    import numpy as np

    from sofim_optax import cpu_runtime

    x = np.random.default_rng(0).normal(size=(3, 4, 4)).astype(np.float32)
    stack = jnp.asarray(x @ x.transpose(0, 2, 1) + 4 * np.eye(4, dtype=np.float32))
    fn = lambda a, s: jnp.linalg.cholesky(a + s * jnp.eye(4))
    shifts = jnp.arange(3.0)
    expected = jax.vmap(fn)(stack, shifts)
    np.testing.assert_allclose(cpu_runtime.map_stack(fn, stack, shifts), expected, rtol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda a, s: cpu_runtime.map_stack(fn, a, s))(stack, shifts))
    old_cpu = jax.default_backend() == "cpu" and tuple(
        int(v) for v in jaxlib.version.__version__.split(".")[:2]
    ) < (0, 11)
    assert ("scan" in jaxpr) == old_cpu  # lax.map lowers to a scan
    monkeypatch.setenv("SOFIM_OPTAX_NO_CPU_WORKAROUNDS", "1")
    jaxpr = str(jax.make_jaxpr(lambda a, s: cpu_runtime.map_stack(fn, a, s))(stack, shifts))
    assert "scan" not in jaxpr
    np.testing.assert_allclose(cpu_runtime.map_stack(fn, stack, shifts), expected, rtol=1e-6)


COPIES = """
import re, sofim_optax
{call}
import jax, jax.numpy as jnp, numpy as np, optax
from flax import linen as nn
model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(10)])
x = jnp.asarray(np.random.default_rng(0).random((32, 600)), jnp.float32)
y = jnp.zeros((32,), jnp.int32)
params = model.init(jax.random.PRNGKey(0), x[:1])
loss = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
tx = sofim_optax.mbf(learning_rate=1e-3, stats_period=10, inverse_period=100, dense_block_size=64)
def step(p, s):
    _, g, st = sofim_optax.curvature.linen.value_grad_and_stats(loss, p, x, y)
    u, s = tx.update(g, s, p, layer_stats=st)
    return optax.apply_updates(p, u), s
text = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params)).compile().as_text()
# copies of the blocks of the 600-wide layer (64 units x 10 chunks of 61) passed through a
# branch unchanged (a copy of a tuple element, not of a computed value)
print(len(re.findall(r"f32\\[640,61,61\\][^ ]* copy\\(%get-tuple-element", text)))
"""


@pytest.mark.slow
def test_region_analysis_drops_the_copies_of_untaken_branches():
    without = run_python(COPIES.format(call=""))
    assert without.returncode == 0, without.stderr[-2000:]
    configured = run_python(COPIES.format(call="sofim_optax.configure_cpu_runtime()"))
    assert configured.returncode == 0, configured.stderr[-2000:]
    # XLA's default copy insertion copies the block stack in the branches not taken; with the
    # region analysis of configure_cpu_runtime() the compiled step holds no copy of it.
    assert int(without.stdout.split()[-1]) > 0
    assert int(configured.stdout.split()[-1]) == 0


FAULTS = """
import resource, statistics, sofim_optax
{call}
import jax, jax.numpy as jnp
from jax import lax
@jax.jit
def run(x):  # a 64 MB temporary, above glibc's largest mmap threshold (32 MB)
    y = lax.optimization_barrier(x * 2.0)
    return jnp.sum(y[::-1] * x)
x = jnp.ones((16 * 2**20,), jnp.float32)
faults = []
for _ in range(40):  # the heap settles within the first runs; the median of the last 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[20:]))
"""


def _faults_per_run(call: str, **env: str) -> float:
    out = run_python(FAULTS.format(call=call), **env)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.split()[-1])


glibc = pytest.mark.skipif(
    not cpu_runtime.on_glibc(), reason="problem 5 concerns glibc's allocator"
)


@pytest.mark.slow  # (one of the suite's slowest, 5-11 s; make test-slow)
@glibc
def test_configured_runs_reuse_their_temporaries_pages():
    # Without the settings every run maps its 64 MB temporary afresh: one page fault per
    # 4 KiB page touched (16 384 here). With them, the pages of earlier runs are reused.
    without = _faults_per_run("")
    configured = _faults_per_run("sofim_optax.configure_cpu_runtime()")
    assert without > 10_000
    assert configured < 0.01 * without


@glibc
@pytest.mark.slow
def test_allocator_settings_of_the_user_are_kept():
    call = "assert not sofim_optax.cpu_runtime.keep_freed_memory(); " + CONFIGURE
    assert _faults_per_run(call, MALLOC_ARENA_MAX="2") > 10_000
