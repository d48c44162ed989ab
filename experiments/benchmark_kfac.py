"""KFAC benchmark: capture cost, per-step time against SGD-momentum, and kfac-jax side by side.

Commands that produce the README figures (CPU; about 15–20 min on a 2-core machine)::

    python -m experiments.benchmark_kfac --out runs/benchmark_kfac
    python -m experiments.benchmark_kfac --quick --out runs/benchmark_kfac_quick   # smoke run, a few minutes

Useful while developing: ``--kfac-jax-venv /tmp/kfacjax_venv`` (reuse a ready environment),
``--parts capture,step_time`` (skip the training comparison), ``--no-kfac-jax``.

Machines are noisy, so no time is reported alone: every timing interleaves rounds of all
contenders (the baseline first in every round), takes the median over rounds and divides by
the baseline's median from the same run. Three parts:

1. **capture** — ``sofim_optax.curvature.linen.value_grad_and_stats`` (empirical and
   sampled Fisher) over plain ``jax.value_and_grad``, both jitted, on the deep autoencoder
   (784-1000-500-250-30-250-500-1000-784, batch 1000, sigmoid cross-entropy) and on
   ``SmallCNN`` (batch 128, softmax cross-entropy).
2. **step_time** — the whole jitted train step of KFAC (capture + ``kfac`` update + apply,
   ``inverse_period=20``) over SGD-momentum's (``value_and_grad`` + ``optax.sgd(momentum=0.9)``
   + apply), on both models. Each timed block is ``--block-steps`` (a multiple of 20) steps,
   so inverse refreshes are included in proportion. On the autoencoder the same rounds also
   time kfac-jax 0.0.8 (fixed and adaptive) and an SGD-momentum step written in plain jax,
   all three in kfac-jax's own pinned environment (jax 0.9.0), through a server process
   (``experiments/kfac_jax_runner.py serve``) that runs K steps on request, so kfac-jax's
   rounds interleave with ours.
3. **kfac_jax** — training on the real Fashion-MNIST training images with the autoencoder,
   L2 ``½·1e-5·Σ‖W‖²`` over kernels in the loss, batch 1000, the same initial parameters
   (our Flax initialisation, exported to kfac-jax) and the same minibatch order
   (:func:`experiments.kfac_jax_runner.batch_indices`) for every method. Contenders:
   our ``kfac`` with the sampled Fisher (the like-for-like comparison: kfac-jax's default
   estimator ``fisher_gradients`` samples too) and with the empirical Fisher (our default),
   kfac-jax with fixed learning rate / momentum / damping and with its adaptive ones, and
   SGD-momentum and Adam as references. Each is tuned on the small grid in :data:`GRIDS`
   for ``--tune-steps`` steps (selection: lowest mean minibatch loss over the last
   ``--select-last`` steps), then trained for ``--steps`` steps. Reported: the training loss
   (mean minibatch loss over the last ``--select-last`` steps; the minibatches are the same
   for everyone) after the same number of steps, the loss on the first 10 000 training
   images at the end, and the loss at the same wall time. The wall-time axis of every curve
   is ``steps × (its median amortised per-step time from part 2)``, so that the comparison
   at equal time rests on interleaved timings rather than on one noisy sequential run (the
   raw measured times are in the JSON too).

Our KFAC trains with ``inverse="cholesky"`` in part 3 (``--our-inverse``): it stores explicit
damped inverses as kfac-jax does, and with a fixed damping it gives the same iterates as the
default ``"eigh"`` at a lower cost per step (part 2 times both).

On CPU with jaxlib < 0.11, ``sofim_optax`` decomposes KFAC's factor stacks one matrix at a
time (``sofim_optax._cpu_runtime.map_stack``): jaxlib 0.10's batched LAPACK kernels can
deadlock XLA's CPU thread pool.

Outputs under ``--out``: ``results.json``, ``table.md`` (the markdown tables also printed)
and ``curves.png`` (training loss against steps and against wall time).

kfac-jax 0.0.8 needs jax 0.9.x (it fails with jax 0.9.2 and newer), so the script creates a
virtual environment with ``kfac-jax==0.0.8 jax==0.9.0 jaxlib==0.9.0`` at ``--kfac-jax-venv``
(default ``$XDG_CACHE_HOME`` or ``~/.cache``, then ``sofim_optax/kfac-jax-0.0.8-venv``),
reusing it when it already imports kfac_jax.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofim_optax
from experiments import datasets, models
from experiments.kfac_jax_runner import batch_indices
from sofim_optax.curvature import linen as curvature_linen
from sofim_optax.curvature import losses

__all__ = [
    "GRIDS",
    "Problem",
    "autoencoder_problem",
    "cnn_problem",
    "capture_cost",
    "step_times",
    "make_train_step",
    "train_run",
    "export_npz",
    "runner_config",
    "ensure_kfac_jax_venv",
    "main",
]

RUNNER = Path(__file__).with_name("kfac_jax_runner.py")
KFAC_JAX_PINS = ("kfac-jax==0.0.8", "jax==0.9.0", "jaxlib==0.9.0")
L2_REG = 1e-5
MOMENTUM = 0.9
INVERSE_PERIOD = 20
EMA = 0.95

# Tuning grids (short horizon; selection = lowest mean minibatch loss over the last K steps).
# The damping λ lives on the scale of the Fisher of a loss summed over 784 pixels, which is
# hundreds of times larger than for a per-example loss of order one (Martens & Grosse start
# the autoencoders at λ = 150).
# ``None`` (our KFAC with the empirical Fisher, by default): no tuning of its own, it reuses the
# point chosen for the sampled Fisher (pass --tune-empirical to give it the same grid).
GRIDS: dict[str, dict[str, list[float]] | None] = {
    "kfac_sampled": {"learning_rate": [0.1, 0.3, 1.0], "damping": [10.0, 100.0, 1000.0]},
    "kfac_empirical": None,
    "kfac_jax_fixed": {"learning_rate": [0.1, 0.3, 1.0], "damping": [10.0, 100.0, 1000.0]},
    "kfac_jax_adaptive": {"damping": [1.0, 10.0, 100.0]},
    "sgdm": {"learning_rate": [3e-4, 1e-3, 3e-3]},
    "adam": {"learning_rate": [3e-4, 1e-3, 3e-3]},
}
QUICK_GRIDS: dict[str, dict[str, list[float]] | None] = {
    "kfac_sampled": {"learning_rate": [0.1, 0.3], "damping": [100.0]},
    "kfac_empirical": None,
    "kfac_jax_fixed": {"learning_rate": [0.1], "damping": [10.0, 100.0]},
    "kfac_jax_adaptive": {"damping": [10.0]},
    "sgdm": {"learning_rate": [1e-3]},
    "adam": {"learning_rate": [1e-3]},
}
LABELS = {
    "kfac_sampled": "sofim_optax KFAC (sampled Fisher)",
    "kfac_empirical": "sofim_optax KFAC (empirical Fisher)",
    "kfac_jax_fixed": "kfac-jax 0.0.8 (fixed lr/momentum/damping)",
    "kfac_jax_adaptive": "kfac-jax 0.0.8 (adaptive lr/momentum/damping)",
    "sgdm": "SGD-momentum",
    "adam": "Adam",
}
KFAC_FAMILY = ("kfac_sampled", "kfac_empirical", "kfac_jax_fixed", "kfac_jax_adaptive")


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


class Problem:
    """A model, its loss and a batch: ``loss_fn(params, *batch)``, params the inner Flax dict."""

    def __init__(self, name: str, model: nn.Module, loss: Callable, batch: tuple, l2_reg: float = 0.0, seed: int = 0):
        self.name = name
        self.model = model
        self.batch = tuple(jnp.asarray(b) for b in batch)
        self.params = jax.jit(model.init)(jax.random.PRNGKey(seed), self.batch[0][:1])["params"]
        self.l2_reg = l2_reg
        self._loss = loss

    def loss_fn(self, params: Any, x: jax.Array, *rest: jax.Array) -> jax.Array:
        logits = self.model.apply({"params": params}, x)
        value = self._loss(logits, x, *rest)
        if self.l2_reg:
            kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if "kernel" in jax.tree_util.keystr(path)]
            value = value + 0.5 * self.l2_reg * sum(jnp.sum(jnp.square(k)) for k in kernels)
        return value


def autoencoder_problem(
    batch_size: int = 1000, encoder: Sequence[int] = (1000, 500, 250, 30), x: np.ndarray | None = None,
    l2_reg: float = L2_REG, seed: int = 0,
) -> Problem:
    """The deep autoencoder with the sigmoid cross-entropy summed over pixels (registered for
    the sampled Fisher) plus ``½·l2_reg·Σ‖W‖²``; ``x`` defaults to uniform random pixels."""
    if x is None:
        x = np.random.default_rng(seed).random((batch_size, 784), dtype=np.float32)
    model = models.Autoencoder(encoder=tuple(encoder), output_dim=x.shape[1])
    return Problem("autoencoder", model, lambda logits, x: losses.sigmoid_binary_cross_entropy(logits, x), (x[:batch_size],), l2_reg, seed)


def cnn_problem(batch_size: int = 128, seed: int = 0, channels: Sequence[int] = (32, 64), hidden: int = 128,
                side: int = 28) -> Problem:
    """``SmallCNN`` on random ``side×side`` images with softmax cross-entropy (registered)."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size, side, side, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    model = models.SmallCNN(channels=tuple(channels), hidden=hidden)
    return Problem("SmallCNN", model, lambda logits, x, y: losses.softmax_cross_entropy(logits, y), (x, y), 0.0, seed)


# --------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------


def _interleave(contenders: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Runs ``rounds`` rounds, each calling every contender once in order; returns the samples."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            samples[name].append(run())
    return samples


def _timed_calls(fn: Callable, args: tuple, calls: int) -> Callable[[], float]:
    """A contender that makes ``calls`` calls of ``fn(*args)`` and returns seconds per call."""

    def run() -> float:
        jax.block_until_ready(args)
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / calls

    return run


def capture_cost(problem: Problem, rounds: int = 5, calls: int = 5, seed: int = 0) -> dict[str, Any]:
    """Median seconds per call of jitted ``value_and_grad`` and ``value_grad_and_stats``.

    Returns ``{"times": {name: median seconds}, "ratios": {name: median / value_and_grad's},
    "samples": {...}}`` for the names ``value_and_grad``, ``value_grad_and_stats (empirical)``
    and ``value_grad_and_stats (sampled)``.
    """
    key = jax.random.PRNGKey(seed)
    fns = {
        "value_and_grad": jax.jit(lambda p, k, *b: jax.value_and_grad(problem.loss_fn)(p, *b)),
        "value_grad_and_stats (empirical)": jax.jit(
            lambda p, k, *b: curvature_linen.value_grad_and_stats(problem.loss_fn, p, *b)
        ),
        "value_grad_and_stats (sampled)": jax.jit(
            lambda p, k, *b: curvature_linen.value_grad_and_stats(problem.loss_fn, p, *b, fisher="sampled", rng=k)
        ),
    }
    args = (problem.params, key, *problem.batch)
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn(*args))
    samples = _interleave({n: _timed_calls(f, args, calls) for n, f in fns.items()}, rounds)
    times = {n: statistics.median(s) for n, s in samples.items()}
    base = times["value_and_grad"]
    return {"times": times, "ratios": {n: t / base for n, t in times.items()}, "samples": samples}


# --------------------------------------------------------------------------------------
# Train steps
# --------------------------------------------------------------------------------------


def kfac_tx(inverse: str = "eigh", inverse_period: int = INVERSE_PERIOD) -> optax.GradientTransformationExtraArgs:
    """``sofim_optax.kfac`` with ``learning_rate`` and ``damping`` injected (changeable without
    recompiling, see :func:`set_hparams`), momentum 0.9, EMA 0.95."""
    return optax.inject_hyperparams(
        sofim_optax.kfac, static_args=("inverse", "inverse_period", "stats_period", "ema", "pi_adjusted")
    )(learning_rate=0.1, momentum=MOMENTUM, damping=10.0, ema=EMA, inverse_period=inverse_period, inverse=inverse)


def first_order_tx(name: str) -> optax.GradientTransformation:
    if name == "sgdm":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=1e-3, momentum=MOMENTUM)
    if name == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    raise ValueError(name)


def set_hparams(state: Any, **values: float) -> Any:
    """Writes ``values`` into an ``inject_hyperparams`` state (the same jitted step serves all)."""
    hp = dict(state.hyperparams)
    for k, v in values.items():
        hp[k] = jnp.asarray(v, jnp.asarray(hp[k]).dtype)
    return state._replace(hyperparams=hp)


def make_train_step(problem: Problem, tx: optax.GradientTransformation, fisher: str | None, seed: int = 0) -> Callable:
    """The jitted train step ``step(params, opt_state, step_index, *batch) -> (params, opt_state, loss)``.

    ``fisher=None``: ``jax.value_and_grad`` + ``tx`` (first-order). ``"empirical"`` or
    ``"sampled"``: ``value_grad_and_stats`` (one forward/backward pass) + ``tx.update(...,
    layer_stats=...)``; the sampled Fisher draws with ``fold_in(PRNGKey(seed), step_index)``.
    Parameters and optimizer state are donated.
    """
    base_key = jax.random.PRNGKey(seed + 12345)

    def step(params, opt_state, step_index, *batch):
        if fisher is None:
            loss, grads = jax.value_and_grad(problem.loss_fn)(params, *batch)
            updates, opt_state = tx.update(grads, opt_state, params)
        else:
            key = jax.random.fold_in(base_key, step_index)
            loss, grads, stats = curvature_linen.value_grad_and_stats(
                problem.loss_fn, params, *batch, fisher=fisher, rng=key
            )
            updates, opt_state = tx.update(grads, opt_state, params, layer_stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _copy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


_STEP_CACHE: dict[tuple, tuple[optax.GradientTransformation, Callable]] = {}


def train_step_for(problem: Problem, optimizer: str, fisher: str | None = None,
                   inverse_period: int = INVERSE_PERIOD, seed: int = 0) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, jitted step)`` for ``optimizer`` in ``"sgdm"``, ``"adam"`` (``fisher=None``) or a KFAC
    inverse ``"eigh"``/``"cholesky"`` (``fisher`` ``"empirical"``/``"sampled"``), with injected
    hyperparameters. Cached, so the timing and training parts share one compilation."""
    key = (id(problem), optimizer, fisher, inverse_period, seed)
    if key not in _STEP_CACHE:
        tx = first_order_tx(optimizer) if fisher is None else kfac_tx(optimizer, inverse_period)
        _STEP_CACHE[key] = (tx, make_train_step(problem, tx, fisher, seed))
    return _STEP_CACHE[key]


class _StepRunner:
    """Advances one contender's training state K steps at a time on a fixed batch (for timing)."""

    def __init__(self, problem: Problem, tx: optax.GradientTransformation, step: Callable, **hparams: float):
        self.step = step
        self.params = _copy(problem.params)
        self.state = set_hparams(tx.init(self.params), **hparams)
        self.batch = problem.batch
        self.i = 0

    def advance(self, steps: int) -> float:
        jax.block_until_ready((self.params, self.state))
        t0 = time.perf_counter()
        for _ in range(steps):
            self.params, self.state, loss = self.step(self.params, self.state, np.int32(self.i), *self.batch)
            self.i += 1
        jax.block_until_ready((self.params, self.state))
        return (time.perf_counter() - t0) / steps


STEP_CONTENDERS: dict[str, tuple[str | None, str]] = {
    # name: (fisher, inverse) for KFAC, (None, optimizer) for first-order; SGD-momentum is the baseline.
    "SGD-momentum": (None, "sgdm"),
    "Adam": (None, "adam"),
    "KFAC (eigh, empirical)": ("empirical", "eigh"),
    "KFAC (eigh, sampled)": ("sampled", "eigh"),
    "KFAC (cholesky, empirical)": ("empirical", "cholesky"),
    "KFAC (cholesky, sampled)": ("sampled", "cholesky"),
}


SGD_OLD_JAX = "SGD-momentum (plain jax 0.9, kfac-jax's venv)"


def step_contenders(our_inverse: str = "cholesky", quick: bool = False) -> list[str]:
    """The train steps timed in part 2: SGD-momentum (baseline), Adam, KFAC with ``eigh`` and
    ``cholesky`` (sampled Fisher) and, for the inverse used in part 3, both Fishers."""
    names = ["SGD-momentum", "Adam", "KFAC (eigh, sampled)", "KFAC (cholesky, sampled)"]
    if our_inverse in ("eigh", "cholesky"):
        for fisher in ("sampled", "empirical"):
            n = f"KFAC ({our_inverse}, {fisher})"
            if n not in names:
                names.append(n)
    if quick:
        names = [n for n in names if n == "SGD-momentum" or our_inverse in n]
    return names


def step_times(
    problem: Problem,
    rounds: int = 3,
    block_steps: int = 2 * INVERSE_PERIOD,
    contenders: Sequence[str] | None = None,
    external: Mapping[str, Callable[[int], float]] | None = None,
    inverse_period: int = INVERSE_PERIOD,
    damping: float = 10.0,
) -> dict[str, Any]:
    """Median amortised seconds per train step and the ratio to SGD-momentum's.

    Every contender is compiled and warmed up past its first inverse refresh, then timed in
    ``rounds`` interleaved rounds of ``block_steps`` steps each (a multiple of
    ``inverse_period``, so every block holds the same number of refreshes). ``external``
    adds contenders timed elsewhere (``f(steps) -> seconds per step``, e.g. kfac-jax's server).
    """
    if block_steps % inverse_period:
        raise ValueError(f"block_steps={block_steps} must be a multiple of inverse_period={inverse_period}")
    names = list(contenders) if contenders is not None else list(STEP_CONTENDERS)
    if names[0] != "SGD-momentum":
        names = ["SGD-momentum"] + [n for n in names if n != "SGD-momentum"]
    runners: dict[str, Callable[[], float]] = {}
    for name in names:
        fisher, optimizer = STEP_CONTENDERS[name]
        tx, step = train_step_for(problem, optimizer, fisher, inverse_period)
        hparams = {"learning_rate": 1e-4} if fisher is None else {"learning_rate": 1e-3, "damping": damping}
        r = _StepRunner(problem, tx, step, **hparams)
        r.advance(inverse_period + 1)  # compile, first refresh, warm up
        runners[name] = lambda r=r: r.advance(block_steps)
    for name, f in (external or {}).items():
        runners[name] = lambda f=f: f(block_steps)
    samples = _interleave(runners, rounds)
    times = {n: statistics.median(s) for n, s in samples.items()}
    base = times["SGD-momentum"]
    return {"times": times, "ratios": {n: t / base for n, t in times.items()}, "samples": samples,
            "block_steps": block_steps, "rounds": rounds}


# --------------------------------------------------------------------------------------
# Training runs (our side)
# --------------------------------------------------------------------------------------


def train_run(
    step: Callable, params0: Any, opt_state0: Any, x_train: np.ndarray, steps: int, batch_size: int, seed: int,
    log_every: int = 10,
) -> dict[str, Any]:
    """Trains with ``step`` on minibatches of ``x_train`` drawn by :func:`batch_indices`.

    Returns the minibatch loss of every step, the measured wall time at every
    ``log_every``-th step (the first step, which compiles, is excluded and timed apart), and
    the final parameters.
    """
    params, state = _copy(params0), _copy(opt_state0)
    order = batch_indices(len(x_train), batch_size, seed)
    t0 = time.perf_counter()
    params, state, loss = step(params, state, np.int32(0), jnp.asarray(x_train[next(order)]))
    jax.block_until_ready(params)
    first_step_time = time.perf_counter() - t0
    losses = [loss]
    time_log = [(1, 0.0)]
    wall = 0.0
    t_block = time.perf_counter()
    for i in range(1, steps):
        params, state, loss = step(params, state, np.int32(i), jnp.asarray(x_train[next(order)]))
        losses.append(loss)
        if (i + 1) % log_every == 0 or i == steps - 1:
            jax.block_until_ready(params)
            now = time.perf_counter()
            wall += now - t_block
            t_block = now
            time_log.append((i + 1, wall))
    return {
        "losses": [float(l) for l in losses],
        "time_log": time_log,
        "first_step_time": first_step_time,
        "mean_step_time": wall / max(1, steps - 1),
        "params": params,
    }


def full_loss(problem: Problem, params: Any, x: np.ndarray, chunk: int = 1000) -> float:
    """``problem.loss_fn`` (L2 term included) averaged over all of ``x``, in chunks."""
    f = jax.jit(problem.loss_fn)
    total = 0.0
    for i in range(0, len(x), chunk):
        xb = jnp.asarray(x[i : i + chunk])
        total += float(f(params, xb)) * len(xb)
    return total / len(x)


def mean_last(losses: Sequence[float], k: int) -> float:
    """Mean of the last ``k`` values (non-finite values make it ``inf``)."""
    tail = np.asarray(losses[-k:], dtype=np.float64)
    return float(np.mean(tail)) if np.all(np.isfinite(tail)) else math.inf


def smoothed(losses: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps (shorter at the start); non-finite stays non-finite."""
    a = np.asarray(losses, dtype=np.float64)
    c = np.cumsum(np.concatenate([[0.0], a]))
    idx = np.arange(1, len(a) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def grid_points(grid: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    points: list[dict[str, float]] = [{}]
    for k, values in grid.items():
        points = [{**p, k: v} for p in points for v in values]
    return points


# --------------------------------------------------------------------------------------
# kfac-jax side: environment, data export, runner
# --------------------------------------------------------------------------------------


def default_kfac_jax_venv() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "sofim_optax" / "kfac-jax-0.0.8-venv"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def kfac_jax_venv_ready(venv: Path) -> bool:
    py = _venv_python(venv)
    if not py.exists():
        return False
    check = "import kfac_jax, jax; print(kfac_jax.__version__, jax.__version__)"
    r = subprocess.run([str(py), "-c", check], capture_output=True, text=True, env=_runner_env())
    return r.returncode == 0


def ensure_kfac_jax_venv(venv: Path, log: Callable[[str], None] = print) -> Path:
    """Returns the venv's python, creating the pinned environment first if it does not import kfac_jax."""
    venv = Path(venv)
    if kfac_jax_venv_ready(venv):
        return _venv_python(venv)
    log(f"creating the kfac-jax environment at {venv} ({' '.join(KFAC_JAX_PINS)}) ...")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(_venv_python(venv)), "-m", "pip", "install", "--quiet", *KFAC_JAX_PINS], check=True)
    if not kfac_jax_venv_ready(venv):
        raise RuntimeError(f"{venv} was created but does not import kfac_jax")
    return _venv_python(venv)


def _runner_env() -> dict[str, str]:
    """The runner's environment: ours, minus the variables that point at our own venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    # Same LAPACK threading as in this process (sofim_optax defaults it to 1 at import).
    if "OPENBLAS_NUM_THREADS" in os.environ:
        env["OPENBLAS_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"]
    return env


def export_npz(path: Path, x_train: np.ndarray, params: Mapping[str, Any]) -> None:
    """Writes ``x_train`` and the autoencoder's parameters as ``w{i}``/``b{i}`` (``Dense_i``)."""
    arrays = {"x_train": np.asarray(x_train, np.float32)}
    n = len([k for k in params if k.startswith("Dense_")])
    for i in range(n):
        arrays[f"w{i}"] = np.asarray(params[f"Dense_{i}"]["kernel"], np.float32)
        arrays[f"b{i}"] = np.asarray(params[f"Dense_{i}"]["bias"], np.float32)
    np.savez(path, **arrays)


def runner_config(runs: Sequence[Mapping[str, Any]], *, batch_size: int, seed: int, log_every: int = 10,
                  eval_examples: int = 10000, eval: bool = True, warmup_steps: int | None = None) -> dict[str, Any]:
    cfg = {
        "batch_size": batch_size,
        "l2_reg": L2_REG,
        "ema": EMA,
        "inverse_period": INVERSE_PERIOD,
        "estimation_mode": "fisher_gradients",
        "seed": seed,
        "log_every": log_every,
        "eval_examples": eval_examples,
        "eval": eval,
        "runs": [dict(r) for r in runs],
    }
    if warmup_steps is not None:
        cfg["warmup_steps"] = warmup_steps
    return cfg


def run_kfac_jax_train(python: Path, workdir: Path, data: Path, config: Mapping[str, Any], tag: str,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    cfg_path, out_path = workdir / f"{tag}_config.json", workdir / f"{tag}_out.json"
    cfg_path.write_text(json.dumps(config))
    proc = subprocess.Popen([str(python), str(RUNNER), "train", str(cfg_path), str(data), str(out_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_runner_env())
    assert proc.stdout is not None
    for line in proc.stdout:
        log(f"  kfac-jax: {line.strip()}")
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0:
        raise RuntimeError(f"kfac-jax runner failed:\n{err[-4000:]}")
    return json.loads(out_path.read_text())


class KfacJaxServer:
    """``kfac_jax_runner.py serve``: times K kfac-jax steps on request (interleaved rounds)."""

    def __init__(self, python: Path, workdir: Path, data: Path, config: Mapping[str, Any]):
        cfg_path = workdir / "serve_config.json"
        cfg_path.write_text(json.dumps(config))
        self.stderr = open(workdir / "serve_stderr.txt", "w")
        self.proc = subprocess.Popen([str(python), str(RUNNER), "serve", str(cfg_path), str(data)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=_runner_env())
        self.ready = self._read()
        if not self.ready.get("ready"):
            raise RuntimeError(f"kfac-jax server did not start: {self.ready}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.flush()
            raise RuntimeError(f"kfac-jax server exited (see {self.stderr.name})")
        return json.loads(line)

    def time_steps(self, name: str, steps: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"name": name, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._read()["seconds"] / steps

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if not np.isfinite(x) or abs(x) > 1e6:
        return "diverged"
    return f"{x:.{digits}f}"


def targets_summary(results: Mapping[str, Any], our_inverse: str) -> list[str]:
    """Markdown lines: each target of issue 3's benchmark section, the measured value, met or not."""
    lines = ["\n## Targets\n", "| target | measured | met |", "|---|---|---|"]
    yes = lambda ok: "yes" if ok else "**no**"
    for model, r in results.get("step_time", {}).items():
        for name, ratio in r["ratios"].items():
            if name.startswith("KFAC"):
                lines.append(f"| KFAC step ≤ 2× SGD-momentum ({model}, {name}) | {ratio:.2f}× | {yes(ratio <= 2.0)} |")
    ae = results.get("step_time", {}).get("autoencoder", {}).get("times", {})
    for fisher in ("sampled", "empirical"):
        ours = ae.get(f"KFAC ({our_inverse}, {fisher})")
        for other in ("kfac-jax fixed", "kfac-jax adaptive"):
            if ours and ae.get(other):
                ratio = ours / ae[other]
                norm = ""
                if ae.get(SGD_OLD_JAX) and ae.get("SGD-momentum"):
                    own = (ours / ae["SGD-momentum"]) / (ae[other] / ae[SGD_OLD_JAX])
                    norm = f" (each over its own jax's SGD-momentum: {own:.2f}×)"
                lines.append(f"| per-step time below kfac-jax (ours {our_inverse}/{fisher} vs {other}) | "
                             f"{ratio:.2f}×{norm} | {yes(ratio < 1.0)} |")
    cmp = results.get("kfac_jax")
    if cmp and cmp.get("equal_time_s"):
        t = cmp["equal_time_s"]
        m = cmp["methods"]
        for ours in ("kfac_sampled", "kfac_empirical"):
            for other in ("kfac_jax_fixed", "kfac_jax_adaptive"):
                if ours in m and other in m:
                    a, b = m[ours]["loss_at_equal_time"], m[other]["loss_at_equal_time"]
                    ok = np.isfinite(a) and (not np.isfinite(b) or a <= b)
                    lines.append(f"| training loss at {t:.0f} s ≤ kfac-jax ({LABELS[ours]} vs {LABELS[other]}) | "
                                 f"{_fmt(a)} vs {_fmt(b)} | {yes(ok)} |")
    return lines if len(lines) > 3 else []


def capture_table(results: Mapping[str, Any]) -> str:
    lines = ["| model | batch | function | ms per call | ratio to value_and_grad |", "|---|---:|---|---:|---:|"]
    for model, r in results.items():
        for name, t in r["times"].items():
            lines.append(f"| {model} | {r['batch']} | `{name}` | {1e3 * t:.1f} | {r['ratios'][name]:.2f} |")
    return "\n".join(lines)


def step_table(results: Mapping[str, Any]) -> str:
    lines = ["| model | batch | train step | ms per step (amortised) | ratio to SGD-momentum |", "|---|---:|---|---:|---:|"]
    for model, r in results.items():
        for name, t in r["times"].items():
            lines.append(f"| {model} | {r['batch']} | {name} | {1e3 * t:.0f} | {r['ratios'][name]:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/benchmark_kfac")
    p.add_argument("--parts", default="capture,step_time,kfac_jax", help="comma-separated subset of capture,step_time,kfac_jax")
    p.add_argument("--quick", action="store_true", help="smoke run: few rounds, steps and grid points")
    p.add_argument("--small-grids", action="store_true", help="tune on the quick grids (QUICK_GRIDS) at full length")
    p.add_argument("--no-kfac-jax", action="store_true", help="leave kfac-jax out (no venv needed)")
    p.add_argument("--kfac-jax-venv", default=str(default_kfac_jax_venv()))
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the loader's lookup)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capture-rounds", type=int, default=5)
    p.add_argument("--step-rounds", type=int, default=3)
    p.add_argument("--block-steps", type=int, default=INVERSE_PERIOD, help="steps per timed block (a multiple of 20)")
    p.add_argument("--steps", type=int, default=120, help="training steps of the final runs (60 per epoch)")
    p.add_argument("--tune-steps", type=int, default=25, help="training steps of each tuning run")
    p.add_argument("--select-last", type=int, default=10, help="K: losses are averaged over the last K steps")
    p.add_argument("--our-inverse", default="cholesky", choices=("eigh", "cholesky"),
                   help="inverse of our KFAC in the training comparison (same iterates, different cost)")
    p.add_argument("--no-empirical", action="store_true", help="skip our KFAC with the empirical Fisher")
    p.add_argument("--tune-empirical", action="store_true",
                   help="tune our empirical-Fisher KFAC on its own grid (default: reuse the sampled one's point)")
    args = p.parse_args(argv)
    if args.quick:
        args.capture_rounds = min(args.capture_rounds, 1)
        args.step_rounds = min(args.step_rounds, 1)
        args.steps = min(args.steps, 20)
        args.tune_steps = min(args.tune_steps, 10)
        args.select_last = min(args.select_last, 5)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = set(args.parts) - {"capture", "step_time", "kfac_jax"}
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}")
    if args.block_steps % INVERSE_PERIOD:
        p.error(f"--block-steps must be a multiple of {INVERSE_PERIOD}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring) and returns everything it wrote to JSON."""
    args = _parse(argv)
    from sofim_optax import _cpu_runtime

    return _main(args, _cpu_runtime._sequential_decompositions())


def _main(args: argparse.Namespace, workaround: bool) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "versions": {"jax": jax.__version__, "optax": optax.__version__, "sofim_optax": sofim_optax.__version__},
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {os.cpu_count()} CPUs",
        "args": {k: v for k, v in vars(args).items()},
        "env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "OPENBLAS_NUM_THREADS")},
        "sequential_factor_decompositions": workaround,
    }
    md: list[str] = [f"jax {jax.__version__} on {results['device']}; XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, "
                     f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')!r}; "
                     f"KFAC factor stacks decomposed {'one matrix at a time (jaxlib<0.11 CPU work-around)' if workaround else 'batched'}"]

    def say(text: str) -> None:
        print(text, flush=True)

    say(md[0])
    t_start = time.perf_counter()
    part_times: dict[str, float] = {}
    use_kfac_jax = not args.no_kfac_jax and ("kfac_jax" in args.parts or "step_time" in args.parts)
    python = ensure_kfac_jax_venv(Path(args.kfac_jax_venv), say) if use_kfac_jax else None
    grids = QUICK_GRIDS if (args.quick or args.small_grids) else GRIDS
    results["grids"] = grids

    with tempfile.TemporaryDirectory(prefix="benchmark_kfac_") as tmp:
        workdir = Path(tmp)
        data_npz = workdir / "data.npz"
        ae = None
        x_train = None
        if "kfac_jax" in args.parts or ("step_time" in args.parts and use_kfac_jax):
            ds = datasets.to_float_arrays(datasets.load_fashion_mnist(args.data_dir, download=False), flatten=True)
            x_train = ds.x_train
        if x_train is not None:
            ae = autoencoder_problem(1000, x=x_train, seed=args.seed)
            if python is not None:
                export_npz(data_npz, x_train, ae.params)

        # 1. capture cost
        if "capture" in args.parts:
            t_part = time.perf_counter()
            say("\n## Capture cost")
            cap = {}
            for problem, batch in ((ae or autoencoder_problem(1000, seed=args.seed), 1000), (cnn_problem(128, args.seed), 128)):
                r = capture_cost(problem, rounds=args.capture_rounds, calls=3 if problem.name == "autoencoder" else 10)
                r["batch"] = batch
                cap[problem.name] = r
            results["capture"] = cap
            table = capture_table(cap)
            md += ["\n## Capture cost (median of interleaved rounds)\n", table]
            say(table)
            part_times["capture"] = time.perf_counter() - t_part

        # 2. per-step time
        step_res: dict[str, Any] = {}
        if "step_time" in args.parts:
            t_part = time.perf_counter()
            say("\n## Per-step time")
            problem = ae or autoencoder_problem(1000, seed=args.seed)
            names = step_contenders(args.our_inverse, quick=args.quick)
            external = {}
            server = None
            if python is not None and ae is not None:
                serve_runs = [
                    {"name": "kfac-jax fixed", "mode": "fixed", "learning_rate": 1e-3, "momentum": MOMENTUM, "damping": 100.0},
                    {"name": "kfac-jax adaptive", "mode": "adaptive", "damping": 100.0},
                    {"name": SGD_OLD_JAX, "mode": "sgdm", "learning_rate": 1e-4, "momentum": MOMENTUM},
                ]
                server = KfacJaxServer(python, workdir, data_npz,
                                       runner_config(serve_runs, batch_size=1000, seed=args.seed, warmup_steps=INVERSE_PERIOD + 1))
                for run in serve_runs:
                    external[run["name"]] = lambda steps, n=run["name"]: server.time_steps(n, steps)
            try:
                r = step_times(problem, rounds=args.step_rounds, block_steps=args.block_steps, contenders=names,
                               external=external)
            finally:
                if server is not None:
                    server.close()
            r["batch"] = 1000
            step_res["autoencoder"] = r
            r = step_times(cnn_problem(128, args.seed), rounds=args.step_rounds, block_steps=args.block_steps,
                           contenders=[n for n in names if n != "Adam"])
            r["batch"] = 128
            step_res["SmallCNN"] = r
            results["step_time"] = step_res
            table = step_table(step_res)
            md += ["\n## Per-step time (amortised over whole inverse periods; median of interleaved rounds)\n", table]
            say(table)
            part_times["step_time"] = time.perf_counter() - t_part

        # 3. training side by side with kfac-jax
        if "kfac_jax" in args.parts:
            t_part = time.perf_counter()
            assert ae is not None and x_train is not None
            cmp_res = compare_with_kfac_jax(args, ae, x_train, python, workdir, data_npz, grids,
                                            step_res.get("autoencoder"), say)
            results["kfac_jax"] = cmp_res
            md += cmp_res.pop("_markdown")
            plot_curves(cmp_res, out / "curves.png")
            part_times["kfac_jax"] = time.perf_counter() - t_part

    summary = targets_summary(results, args.our_inverse)
    if summary:
        md += summary
        say("\n".join(summary))
    results["part_times_s"] = part_times

    results["total_time_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
    (out / "table.md").write_text("\n".join(md) + "\n")
    say(f"\nwrote {out / 'results.json'}, {out / 'table.md'}" + (f", {out / 'curves.png'}" if "kfac_jax" in args.parts else "")
        + f" in {results['total_time_s'] / 60:.1f} min ("
        + ", ".join(f"{k} {v / 60:.1f}" for k, v in part_times.items()) + ")")
    return results


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if k != "params"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# --------------------------------------------------------------------------------------
# Part 3
# --------------------------------------------------------------------------------------


def _our_runs(method: str, problem: Problem, x_train: np.ndarray, points: Sequence[Mapping[str, float]], steps: int,
              seed: int, inverse: str, say: Callable[[str], None], eval_x: np.ndarray | None = None,
              k: int = 10) -> list[dict[str, Any]]:
    """Runs our contender ``method`` once per hyperparameter point, sharing one compiled step."""
    if method.startswith("kfac"):
        tx, step = train_step_for(problem, inverse, method.split("_")[1])
    else:
        tx, step = train_step_for(problem, method)
    state0 = tx.init(problem.params)
    runs = []
    for hp in points:
        r = train_run(step, problem.params, set_hparams(state0, **hp), x_train, steps, 1000, seed)
        r["hparams"] = dict(hp)
        if eval_x is not None:
            r["final_full_loss"] = full_loss(problem, r["params"], eval_x)
        r.pop("params")
        say(f"  {method} {hp}: last-{k} mean {mean_last(r['losses'], k):.2f}, {1e3 * r['mean_step_time']:.0f} ms/step")
        runs.append(r)
    return runs


def _kfac_jax_points(method: str, points: Sequence[Mapping[str, float]], steps: int) -> list[dict[str, Any]]:
    mode = method.split("_")[-1]
    runs = []
    for i, hp in enumerate(points):
        run = {"name": f"{method}_{i}", "mode": mode, "steps": steps, "damping": hp["damping"]}
        if mode == "fixed":
            run.update(learning_rate=hp["learning_rate"], momentum=MOMENTUM)
        runs.append(run)
    return runs


def compare_with_kfac_jax(args, ae: Problem, x_train: np.ndarray, python: Path | None, workdir: Path, data_npz: Path,
                          grids: Mapping[str, Mapping[str, Sequence[float]]], step_res: Mapping[str, Any] | None,
                          say: Callable[[str], None]) -> dict[str, Any]:
    k = args.select_last
    methods = ["kfac_sampled"] + ([] if args.no_empirical else ["kfac_empirical"])
    if python is not None:
        methods += ["kfac_jax_fixed", "kfac_jax_adaptive"]
    ref_methods = ["sgdm", "adam"]
    eval_x = x_train[:10000]
    res: dict[str, Any] = {"methods": {}, "select_last": k, "steps": args.steps, "tune_steps": args.tune_steps}

    # Per-step times for the wall-time axis (medians of part 2 when it ran).
    step_time_of: dict[str, float] = {}
    if step_res is not None:
        t = step_res["times"]
        step_time_of["kfac_sampled"] = t.get(f"KFAC ({args.our_inverse}, sampled)")
        step_time_of["kfac_empirical"] = t.get(f"KFAC ({args.our_inverse}, empirical)")
        step_time_of["kfac_jax_fixed"] = t.get("kfac-jax fixed")
        step_time_of["kfac_jax_adaptive"] = t.get("kfac-jax adaptive")
        step_time_of["sgdm"] = t.get("SGD-momentum")
        step_time_of["adam"] = t.get("Adam")

    # ---- tuning
    say(f"\n## Tuning ({args.tune_steps} steps per point; selection: lowest mean loss over the last {k} steps)")
    tuned: dict[str, dict[str, Any]] = {}
    for method in methods + ref_methods:
        grid = grids[method]
        if grid is None and method == "kfac_empirical" and args.tune_empirical:
            grid = grids["kfac_sampled"]
        if grid is None:
            src = "kfac_sampled"
            tuned[method] = {"grid": [], "best": tuned[src]["best"], "best_score": None, "reused_from": src,
                             "mean_step_time": tuned[src]["mean_step_time"]}
            say(f"  -> {method}: reuses {src}'s {tuned[src]['best']} (not tuned separately)")
            continue
        points = grid_points(grid)
        if method.startswith("kfac_jax"):
            out = run_kfac_jax_train(python, workdir, data_npz,
                                     runner_config(_kfac_jax_points(method, points, args.tune_steps), batch_size=1000,
                                                   seed=args.seed, eval=False), f"tune_{method}", say)
            runs = [{"hparams": hp, "losses": r["losses"], "mean_step_time": r["mean_step_time"]} for hp, r in zip(points, out["runs"])]
        else:
            runs = _our_runs(method, ae, x_train, points, args.tune_steps, args.seed, args.our_inverse, say, k=k)
        scores = [mean_last(r["losses"], k) for r in runs]
        best = int(np.argmin(scores))
        tuned[method] = {"grid": [{"hparams": r["hparams"], "score": s} for r, s in zip(runs, scores)],
                         "best": runs[best]["hparams"], "best_score": scores[best],
                         "mean_step_time": float(np.median([r["mean_step_time"] for r in runs]))}
        say(f"  -> {method}: {runs[best]['hparams']} (score {scores[best]:.2f})")
    res["tuning"] = tuned

    # ---- final runs
    say(f"\n## Final runs ({args.steps} steps)")
    for method in methods:
        hp = tuned[method]["best"]
        if method.startswith("kfac_jax"):
            out = run_kfac_jax_train(python, workdir, data_npz,
                                     runner_config(_kfac_jax_points(method, [hp], args.steps), batch_size=1000, seed=args.seed),
                                     f"final_{method}", say)
            r = out["runs"][0]
            r = {"hparams": hp, "losses": r["losses"], "time_log": r["time_log"], "mean_step_time": r["mean_step_time"],
                 "first_step_time": r["first_step_time"], "final_full_loss": r["final_full_loss"], "library": out["library"],
                 "jax": out["jax"]}
        else:
            r = _our_runs(method, ae, x_train, [hp], args.steps, args.seed, args.our_inverse, say, eval_x, k=k)[0]
        res["methods"][method] = r
    # References get as many steps as fit in the fastest KFAC-family run's time (at most 4×).
    kfac_times = [step_time_of.get(m) or res["methods"][m]["mean_step_time"] for m in methods]
    for method in ref_methods:
        own = step_time_of.get(method) or tuned[method]["mean_step_time"]
        n_ref = int(min(4 * args.steps, max(args.steps, math.ceil(args.steps * min(kfac_times) / own) + k)))
        r = _our_runs(method, ae, x_train, [tuned[method]["best"]], n_ref, args.seed, args.our_inverse, say, eval_x, k=k)[0]
        res["methods"][method] = r

    # Wall-time axes: steps × interleaved median per-step time (this run's own mean when absent).
    for method, r in res["methods"].items():
        t = step_time_of.get(method)
        r["step_time"] = t if t else r["mean_step_time"]
        r["step_time_source"] = "interleaved median (part 2)" if t else "this run's mean (sequential)"

    md = _comparison_markdown(res, methods, ref_methods, k, say)
    res["_markdown"] = md
    return res


def loss_at_time(r: Mapping[str, Any], t: float, window: int) -> float:
    """The trailing-``window`` mean loss interpolated at wall time ``t`` (``nan`` past the run's end)."""
    sm = smoothed(r["losses"], window)
    times = np.arange(1, len(sm) + 1) * r["step_time"]
    if t > times[-1] + 1e-9:
        return math.nan
    return float(np.interp(t, times, sm))


def _comparison_markdown(res, methods, ref_methods, k, say) -> list[str]:
    steps = res["steps"]
    md = [f"\n## Training side by side on Fashion-MNIST (autoencoder, batch 1000, {steps} steps)\n"]
    kfac_end = [res["methods"][m]["step_time"] * steps for m in methods]
    t_eq = min(kfac_end) if kfac_end else None
    res["equal_time_s"] = t_eq
    header = ("| method | hyperparameters (tuned) | ms per step (interleaved median) | ms per step (this run) | "
              f"loss after {steps} steps (mean of last {k}) | loss on 10k train images, end of run | "
              f"loss at {t_eq:.0f} s |" if t_eq else "")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for m in methods + ref_methods:
        r = res["methods"][m]
        hp = ", ".join(f"{a}={b:g}" for a, b in r["hparams"].items())
        at_steps = mean_last(r["losses"][:steps], k)
        at_time = loss_at_time(r, t_eq, k) if t_eq else math.nan
        r["loss_at_steps"] = at_steps
        r["loss_at_equal_time"] = at_time
        label = LABELS[m] + (f" ({len(r['losses'])} steps)" if len(r["losses"]) != steps else "")
        interleaved = f"{1e3 * r['step_time']:.0f}" if r["step_time_source"].startswith("interleaved") else "n/a"
        lines.append(f"| {label} | {hp} | {interleaved} | {1e3 * r['mean_step_time']:.0f} | {_fmt(at_steps)} | "
                     f"{_fmt(r.get('final_full_loss'))} | {_fmt(at_time)} |")
    table = "\n".join(lines)
    md.append(table)
    say(table)
    tune_lines = ["\n### Tuning grids (score = mean minibatch loss over the last "
                  f"{k} of {res['tune_steps']} steps)\n", "| method | point | score |", "|---|---|---:|"]
    for m, t in res["tuning"].items():
        for g in t["grid"]:
            mark = " **(chosen)**" if g["hparams"] == t["best"] else ""
            tune_lines.append(f"| {LABELS[m]} | {', '.join(f'{a}={b:g}' for a, b in g['hparams'].items())}{mark} | {_fmt(g['score'])} |")
    md += tune_lines
    say("\n".join(tune_lines))
    return md


def plot_curves(res: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = res["select_last"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for m, r in res["methods"].items():
        sm = smoothed(r["losses"], k)
        steps = np.arange(1, len(sm) + 1)
        style = "-" if m.startswith("kfac") else "--"
        axes[0].plot(steps, sm, style, label=LABELS[m])
        axes[1].plot(steps * r["step_time"], sm, style, label=LABELS[m])
    for ax, xl in zip(axes, ("step", "wall time (s, steps × interleaved median step time)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(f"training loss (mean of last {k} minibatches)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if res.get("equal_time_s"):
        axes[1].axvline(res["equal_time_s"], color="gray", lw=0.8)
        axes[1].set_xlim(0, 1.5 * res["equal_time_s"])
    axes[0].legend(fontsize=8)
    fig.suptitle("Deep autoencoder on Fashion-MNIST, batch 1000: sofim_optax KFAC vs kfac-jax 0.0.8")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
