"""One training loop for every optimizer in the experiments.

An :class:`OptimizerSpec` says how to build an optimizer from hyperparameters
and which extra arguments its ``update`` needs beyond the gradient. The loop
computes exactly those inside one jitted step. Optimizers that need
``layer_stats`` get them from :func:`sofim_optax.curvature.linen.value_grad_and_stats`
in the same forward and backward pass as the gradient.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofim_optax

__all__ = ["OptimizerSpec", "OPTIMIZERS", "EpochMetrics", "RunResult", "make_optimizer", "train", "cross_entropy_loss"]


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """How the experiments build and feed one optimizer.

    Attributes:
      label: the name shown in tables and plots.
      factory: ``factory(**hparams) -> optax.GradientTransformation``.
      defaults: the hyperparameters used when a run gives none; tuned for the
        Fashion-MNIST MLP at batch size 128 (see README).
      extra_args: names of the keyword arguments ``update`` needs besides the
        gradient (``"layer_stats"``, ``"previous_batch_stats"``, ``"obj_fn"``).
    """

    label: str
    factory: Callable[..., optax.GradientTransformation]
    defaults: Mapping[str, Any]
    extra_args: tuple[str, ...] = ()


def _sgdm(learning_rate: float, momentum: float = 0.9, weight_decay: float = 0.0) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate, momentum=momentum))


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sofim": OptimizerSpec("SOFIM", sofim_optax.sofim, {"learning_rate": 5.0, "rho": 10.0, "b1": 0.9}),
    "kfac": OptimizerSpec(
        "KFAC",
        sofim_optax.kfac,
        {"learning_rate": 0.03, "damping": 0.1, "momentum": 0.9, "inverse_period": 20},
        extra_args=("layer_stats",),
    ),
    "sgdm": OptimizerSpec("SGD-momentum", _sgdm, {"learning_rate": 0.05, "momentum": 0.9}),
    "adam": OptimizerSpec("Adam", optax.adam, {"learning_rate": 1e-3}),
}


def make_optimizer(name: str, **overrides: Any) -> tuple[OptimizerSpec, optax.GradientTransformation, dict[str, Any]]:
    """Builds the optimizer ``name`` with its defaults updated by ``overrides``."""
    try:
        spec = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}") from None
    hparams = {**spec.defaults, **overrides}
    return spec, spec.factory(**hparams), hparams


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


@dataclasses.dataclass
class EpochMetrics:
    """Metrics after one epoch. ``wall_time`` counts training steps only (not evaluation or compilation)."""

    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float
    wall_time: float
    mean_step_time: float


@dataclasses.dataclass
class RunResult:
    optimizer: str
    label: str
    hparams: dict[str, Any]
    seed: int
    compile_time: float
    epochs: list[EpochMetrics]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _batches(num_examples: int, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(num_examples)
    for start in range(0, num_examples - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


def train(
    model: nn.Module,
    optimizer: str,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    hparams: Mapping[str, Any] | None = None,
    progress: bool = True,
    eval_batch_size: int = 2000,
) -> RunResult:
    """Trains ``model`` with ``optimizer`` and evaluates on the test set after every epoch.

    Args:
      model: a Flax linen module mapping images to logits.
      optimizer: a key of :data:`OPTIMIZERS`.
      data: ``(x_train, y_train, x_test, y_test)`` as float32 images and int labels.
      epochs: number of passes over the training set (the last partial batch
        of each pass is dropped).
      batch_size: examples per step.
      seed: seeds the initialisation and the order of the batches.
      hparams: overrides of the optimizer's default hyperparameters.
      progress: show a tqdm progress bar with the live loss.
      eval_batch_size: examples per evaluation call.

    Returns:
      A :class:`RunResult` with one :class:`EpochMetrics` per epoch.
    """
    from tqdm.auto import tqdm  # optional dependency of the experiments

    spec, tx, used = make_optimizer(optimizer, **(hparams or {}))
    unsupported = set(spec.extra_args) - {"layer_stats"}
    if unsupported:
        raise NotImplementedError(f"the train loop cannot yet feed {sorted(unsupported)} to {optimizer}")
    needs_stats = "layer_stats" in spec.extra_args
    x_train, y_train, x_test, y_test = data
    params = model.init(jax.random.PRNGKey(seed), jnp.asarray(x_train[:1]))
    opt_state = tx.init(params)

    def loss_fn(params, x, y):
        return cross_entropy_loss(model.apply(params, x), y)

    @jax.jit
    def train_step(params, opt_state, x, y):
        if needs_stats:
            loss, grads, stats = sofim_optax.curvature.linen.value_grad_and_stats(loss_fn, params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params, layer_stats=stats)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def eval_batch(params, x, y):
        logits = model.apply(params, x)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)), jnp.sum(jnp.argmax(logits, -1) == y)

    def evaluate(params):
        total_loss, correct = 0.0, 0
        for start in range(0, len(x_test), eval_batch_size):
            loss, hits = eval_batch(params, x_test[start : start + eval_batch_size], y_test[start : start + eval_batch_size])
            total_loss += float(loss)
            correct += int(hits)
        return total_loss / len(x_test), correct / len(x_test)

    # Compile once outside the timed region.
    t0 = time.perf_counter()
    compiled_step = train_step.lower(params, opt_state, x_train[:batch_size], y_train[:batch_size]).compile()
    compile_time = time.perf_counter() - t0

    rng = np.random.default_rng(seed)
    history: list[EpochMetrics] = []
    wall = 0.0
    steps_per_epoch = len(x_train) // batch_size
    for epoch in range(1, epochs + 1):
        losses = []
        bar = tqdm(
            _batches(len(x_train), batch_size, rng),
            total=steps_per_epoch,
            desc=f"{spec.label} epoch {epoch}/{epochs}",
            disable=not progress,
            leave=False,
        )
        t_start = time.perf_counter()
        for i, idx in enumerate(bar):
            params, opt_state, loss = compiled_step(params, opt_state, x_train[idx], y_train[idx])
            losses.append(loss)
            if progress and i % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
        jax.block_until_ready(params)
        epoch_time = time.perf_counter() - t_start
        wall += epoch_time
        train_loss = float(jnp.mean(jnp.stack(losses)))
        test_loss, test_acc = evaluate(params)
        history.append(EpochMetrics(epoch, train_loss, test_loss, test_acc, wall, epoch_time / max(1, len(losses))))
        if not np.isfinite(train_loss):
            break
    return RunResult(optimizer, spec.label, used, seed, compile_time, history)
