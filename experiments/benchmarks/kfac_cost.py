"""The cost parts of the KFAC benchmark: capture over ``value_and_grad``, train steps over SGD-m.

* :func:`capture_cost`: jitted ``value_grad_and_stats`` (empirical and sampled Fisher) over
  plain ``jax.value_and_grad``;
* :func:`step_times`: whole jitted train steps (KFAC with ``eigh`` or ``cholesky`` inverses,
  Adam) over SGD-momentum's, each block a multiple of the inverse period so that refreshes
  are included in proportion, interleaved with contenders timed elsewhere (kfac-jax).

Both report medians of interleaved rounds (:mod:`experiments.timing`) and ratios to the
baseline's median from the same rounds. Run them through ``python -m experiments.benchmarks.kfac``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

import sofim_optax
from experiments import timing
from experiments.benchmarks.problems import (
    EMA,
    INVERSE_PERIOD,
    MOMENTUM,
    Problem,
    copy_tree,
    injected,
    jitted_step,
    set_hparams,
)
from experiments.registry import OPTIMIZERS
from sofim_optax.curvature import linen as curvature_linen

__all__ = [
    "capture_cost",
    "kfac_tx",
    "first_order_tx",
    "train_step_for",
    "training_step_timer",
    "STEP_CONTENDERS",
    "SGD_OLD_JAX",
    "step_contenders",
    "step_times",
    "capture_table",
    "step_table",
]


def capture_cost(
    problem: Problem, rounds: int = 5, calls: int = 5, seed: int = 0
) -> dict[str, Any]:
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
            lambda p, k, *b: curvature_linen.value_grad_and_stats(
                problem.loss_fn, p, *b, fisher="sampled", rng=k
            )
        ),
    }
    args = (problem.params, key, *problem.batch)
    timers = {n: timing.call_timer(f, args) for n, f in fns.items()}  # compiled and warmed up
    samples = timing.interleaved_rounds(
        {n: lambda t=t: t.seconds_per_step(calls) for n, t in timers.items()}, rounds=rounds
    )
    times = timing.medians(samples)
    return {"times": times, "ratios": timing.ratios(times, "value_and_grad"), "samples": samples}


def kfac_tx(
    inverse: str = "eigh", inverse_period: int = INVERSE_PERIOD
) -> optax.GradientTransformationExtraArgs:
    """``sofim_optax.kfac`` with ``learning_rate`` and ``damping`` injected (changeable without
    recompiling, see :func:`set_hparams`), momentum 0.9, EMA 0.95."""
    hyperparameters = dict(learning_rate=0.1, momentum=MOMENTUM, damping=10.0, ema=EMA)
    return injected(
        sofim_optax.kfac, **hyperparameters, inverse_period=inverse_period, inverse=inverse
    )


def first_order_tx(name: str) -> optax.GradientTransformation:
    if name == "sgdm":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=1e-3, momentum=MOMENTUM)
    if name == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    raise ValueError(name)


_STEP_CACHE: dict[tuple, tuple[optax.GradientTransformation, Callable]] = {}


def train_step_for(
    problem: Problem,
    optimizer: str,
    fisher: str | None = None,
    inverse_period: int = INVERSE_PERIOD,
    seed: int = 0,
) -> tuple[optax.GradientTransformation, Callable]:
    """``(tx, jitted step)`` for ``optimizer`` in ``"sgdm"``, ``"adam"`` (``fisher=None``) or a KFAC
    inverse ``"eigh"``/``"cholesky"`` (``fisher`` ``"empirical"``/``"sampled"``), with injected
    hyperparameters. Cached, so the timing and training parts share one compilation."""
    key = (id(problem), optimizer, fisher, inverse_period, seed)
    if key not in _STEP_CACHE:
        if fisher is None:
            tx, needs = first_order_tx(optimizer), OPTIMIZERS[optimizer].needs
        else:
            tx, needs = kfac_tx(optimizer, inverse_period), OPTIMIZERS["kfac"].needs
        step = jitted_step(problem, tx, needs=needs, fisher=fisher or "empirical", seed=seed)
        _STEP_CACHE[key] = (tx, step)
    return _STEP_CACHE[key]


def training_step_timer(
    problem: Problem,
    tx: optax.GradientTransformation,
    step: Callable,
    *,
    warmup_steps: int,
    **hparams: float,
) -> timing.StepTimer:
    """A :class:`~experiments.timing.StepTimer` of ``step`` training on the problem's fixed batch
    from its initial parameters, with ``hparams`` injected; warmed up for ``warmup_steps``."""
    params = copy_tree(problem.params)
    state = set_hparams(tx.init(params), **hparams)

    def advance(params, opt_state, index):
        params, opt_state, _ = step(params, opt_state, np.int32(index), *problem.batch)
        return params, opt_state, index + 1

    return timing.StepTimer(advance, (params, state, 0), warmup_steps=warmup_steps)


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
        raise ValueError(
            f"block_steps={block_steps} must be a multiple of inverse_period={inverse_period}"
        )
    names = list(contenders) if contenders is not None else list(STEP_CONTENDERS)
    if names[0] != "SGD-momentum":
        names = ["SGD-momentum"] + [n for n in names if n != "SGD-momentum"]
    runners: dict[str, Callable[[], float]] = {}
    for name in names:
        fisher, optimizer = STEP_CONTENDERS[name]
        tx, step = train_step_for(problem, optimizer, fisher, inverse_period)
        hparams = (
            {"learning_rate": 1e-4}
            if fisher is None
            else {"learning_rate": 1e-3, "damping": damping}
        )
        timer = training_step_timer(problem, tx, step, warmup_steps=inverse_period + 1, **hparams)
        runners[name] = lambda t=timer: t.seconds_per_step(block_steps)
    for name, f in (external or {}).items():
        runners[name] = lambda f=f: f(block_steps)
    return {
        **timing.compare(runners, rounds=rounds, baseline="SGD-momentum"),
        "block_steps": block_steps,
    }


def capture_table(results: Mapping[str, Any]) -> str:
    lines = [
        "| model | batch | function | ms per call | ratio to value_and_grad |",
        "|---|---:|---|---:|---:|",
    ]
    for model, r in results.items():
        for name, t in r["times"].items():
            lines.append(
                f"| {model} | {r['batch']} | `{name}` | {1e3 * t:.1f} | {r['ratios'][name]:.2f} |"
            )
    return "\n".join(lines)


def step_table(results: Mapping[str, Any]) -> str:
    lines = [
        "| model | batch | train step | ms per step (amortised) | ratio to SGD-momentum |",
        "|---|---:|---|---:|---:|",
    ]
    for model, r in results.items():
        for name, t in r["times"].items():
            lines.append(
                f"| {model} | {r['batch']} | {name} | {1e3 * t:.0f} | {r['ratios'][name]:.2f} |"
            )
    return "\n".join(lines)
