"""The problems the benchmarks share, their jitted train steps, and training runs on them.

A :class:`Problem` is a Flax model, its loss ``loss_fn(params, *batch)`` and one batch. The
benchmarks time and train it with :func:`jitted_step`, the train step of
:func:`experiments.step.make_train_step` in the benchmarks' calling convention
``step(params, opt_state, step_index, *batch) -> (params, opt_state, loss)``; the sampled
Fisher of step ``t`` draws with ``fold_in(PRNGKey(seed + 12345), t)``. Optimizers are built
with ``optax.inject_hyperparams`` so that one compiled step serves a whole grid
(:func:`set_hparams`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import models
from experiments.benchmarks.kfac_jax_runner import batch_indices
from experiments.step import make_train_step
from sofim_optax.curvature import losses

__all__ = [
    "L2_REG",
    "MOMENTUM",
    "INVERSE_PERIOD",
    "EMA",
    "Problem",
    "autoencoder_problem",
    "cnn_problem",
    "jitted_step",
    "injected",
    "set_hparams",
    "copy_tree",
    "train_run",
    "full_loss",
    "layer_widths",
    "vit_problem",
]

L2_REG = 1e-5
MOMENTUM = 0.9
INVERSE_PERIOD = 20
EMA = 0.95


class Problem:
    """A model, its loss and a batch: ``loss_fn(params, *batch)``, params the inner Flax dict."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        loss: Callable,
        batch: tuple,
        l2_reg: float = 0.0,
        seed: int = 0,
    ):
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
            kernels = [
                leaf
                for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if "kernel" in jax.tree_util.keystr(path)
            ]
            value = value + 0.5 * self.l2_reg * sum(jnp.sum(jnp.square(k)) for k in kernels)
        return value


def autoencoder_problem(
    batch_size: int = 1000,
    encoder: Sequence[int] = (1000, 500, 250, 30),
    x: np.ndarray | None = None,
    l2_reg: float = L2_REG,
    seed: int = 0,
) -> Problem:
    """The deep autoencoder with the sigmoid cross-entropy summed over pixels (registered for
    the sampled Fisher) plus ``½·l2_reg·Σ‖W‖²``; ``x`` defaults to uniform random pixels."""
    if x is None:
        x = np.random.default_rng(seed).random((batch_size, 784), dtype=np.float32)
    model = models.Autoencoder(encoder=tuple(encoder), output_dim=x.shape[1])
    return Problem(
        "autoencoder",
        model,
        lambda logits, x: losses.sigmoid_binary_cross_entropy(logits, x),
        (x[:batch_size],),
        l2_reg,
        seed,
    )


def cnn_problem(
    batch_size: int = 128,
    seed: int = 0,
    channels: Sequence[int] = (32, 64),
    hidden: int = 128,
    side: int = 28,
) -> Problem:
    """``SmallCNN`` on random ``side×side`` images with softmax cross-entropy (registered)."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size, side, side, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    model = models.SmallCNN(channels=tuple(channels), hidden=hidden)
    return Problem(
        "SmallCNN",
        model,
        lambda logits, x, y: losses.softmax_cross_entropy(logits, y),
        (x, y),
        0.0,
        seed,
    )


def vit_problem(batch_size: int = 128, seed: int = 0) -> Problem:
    """The small vision transformer (``models.ViT``: 16 patches of 7×7 plus a class token,
    width 64, 4 blocks of 4 heads) on random 28×28 images, softmax cross-entropy."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    return Problem(
        "ViT",
        models.ViT(),
        lambda logits, x, y: losses.softmax_cross_entropy(logits, y),
        (x, y),
        0.0,
        seed,
    )


# --------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------


def jitted_step(
    problem: Problem,
    tx: optax.GradientTransformation,
    *,
    needs: Sequence[str],
    fisher: str = "empirical",
    seed: int = 0,
) -> Callable:
    """The jitted ``step(params, opt_state, step_index, *batch) -> (params, opt_state, loss)``.

    ``needs`` are the optimizer's (``OPTIMIZERS[name].needs``); with ``fisher="sampled"`` the
    statistics draw with ``fold_in(PRNGKey(seed + 12345), step_index)``. Parameters and
    optimizer state are donated.
    """
    base_key = jax.random.PRNGKey(seed + 12345)
    train_step = make_train_step(problem.loss_fn, tx, needs=needs, fisher=fisher)

    def step(params, opt_state, step_index, *batch):
        out = train_step(params, opt_state, batch, rng=jax.random.fold_in(base_key, step_index))
        return out.params, out.opt_state, out.loss

    return jax.jit(step, donate_argnums=(0, 1))


#: The hyperparameters a benchmark changes between grid points without recompiling.
INJECTED = ("learning_rate", "damping", "momentum")


def injected(alias: Callable[..., Any], **hyperparameters: Any) -> Any:
    """``optax.inject_hyperparams(alias)(**hyperparameters)`` with every argument outside
    :data:`INJECTED` static, so that one compiled step serves a whole grid
    (:func:`set_hparams` changes the injected ones)."""
    static = [k for k in inspect.signature(alias).parameters if k not in INJECTED]
    return optax.inject_hyperparams(alias, static_args=tuple(static))(**hyperparameters)


def set_hparams(state: Any, **values: float) -> Any:
    """Writes ``values`` into an ``inject_hyperparams`` state (the same jitted step serves all)."""
    hp = dict(state.hyperparams)
    for k, v in values.items():
        hp[k] = jnp.asarray(v, jnp.asarray(hp[k]).dtype)
    return state._replace(hyperparams=hp)


def copy_tree(tree: Any) -> Any:
    """A copy of every array of ``tree`` (the steps donate their inputs)."""
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def train_run(
    step: Callable,
    params0: Any,
    opt_state0: Any,
    x_train: np.ndarray,
    steps: int,
    batch_size: int,
    seed: int,
    log_every: int = 10,
) -> dict[str, Any]:
    """Trains with ``step`` on minibatches of ``x_train`` drawn by :func:`batch_indices`.

    Returns the minibatch loss of every step, the measured wall time at every
    ``log_every``-th step (the first step, which compiles, is excluded and timed apart), and
    the final parameters.
    """
    params, state = copy_tree(params0), copy_tree(opt_state0)
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


def layer_widths(text: str) -> tuple[int, ...]:
    """``"1000,500,30"`` -> ``(1000, 500, 30)`` (the ``--encoder`` flags)."""
    return tuple(int(t) for t in text.split(",") if t.strip())
