"""One training loop for every optimizer in the experiments.

The registry
------------
An :class:`OptimizerSpec` says how to build an optimizer from hyperparameters
(its factory, named lazily as ``"module:attribute"`` so that a method that has
not landed in this install fails only when it is selected), its default
hyperparameters (per task kind, and whether they were tuned), and which extra
keyword arguments its ``update`` needs beyond the gradient:

==========================  ===========================================================
extra argument              what the loop passes
==========================  ===========================================================
``layer_stats``             :func:`sofim_optax.curvature.linen.value_grad_and_stats` of
                            the current batch, from the SAME forward/backward pass as
                            the gradient (empirical Fisher, or the sampled Fisher when
                            the loop option ``fisher="sampled"`` is set)
``previous_batch_stats``    the statistics of the PREVIOUS minibatch at the CURRENT
                            parameters (a second ``value_grad_and_stats`` pass inside
                            the same jitted step); ``None`` on the very first step
``obj_fn``                  ``obj_fn(params) -> scalar``: the training loss of the
                            current batch (a closure; batch-norm state is frozen)
``value_fn``                ``value=loss, grad=grads, value_fn=obj_fn`` (optax's
                            L-BFGS line search)
==========================  ===========================================================

:func:`available_optimizers` lists the entries whose factory resolves here.

The loop
--------
:func:`train` runs one model with one optimizer on one :class:`Task`
(``"classification"``: softmax cross-entropy, test loss and accuracy;
``"autoencoder"``: sigmoid cross-entropy summed over pixels and averaged over
the batch, or half the squared error for real-valued data, optional L2 term,
training and test loss). Every step (gradient, statistics, update) is one
jitted function compiled before the clock starts; ``wall_time`` counts
training steps only, not evaluation, checkpoints or compilation. Models with
``BatchNorm`` are supported: every variable collection other than ``params``
(``batch_stats``) is carried as mutable model state.

Reproducibility and resuming: the batch order of epoch ``e`` is drawn from
``numpy.random.default_rng([seed, e])`` and the key of step ``t`` (sampled
Fisher) is ``fold_in(PRNGKey(seed), t)``, so a run restored from the checkpoint
written at the end of an epoch (``flax.serialization`` msgpack, written
atomically) continues exactly as the uninterrupted run would have: same
parameters, same numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofim_optax

__all__ = [
    "OptimizerSpec",
    "OptimizerUnavailable",
    "OPTIMIZERS",
    "EXTRA_ARGS",
    "LOOP_OPTIONS",
    "Task",
    "Data",
    "EpochMetrics",
    "RunResult",
    "available_optimizers",
    "make_optimizer",
    "train",
    "cross_entropy_loss",
    "CheckpointMismatch",
]

logger = logging.getLogger(__name__)

EXTRA_ARGS = ("layer_stats", "previous_batch_stats", "obj_fn", "value_fn")

# Hyperparameter names that configure the loop (how statistics are computed)
# rather than the optimizer; they are taken out before the factory is called.
#   fisher: "empirical" (output gradients of the data's own loss) or "sampled"
#     (targets drawn from the model's predictive distribution, as in KFAC/KPSVD).
#   fisher_batch_size: statistics on the first M examples of the batch only.
LOOP_OPTIONS = ("fisher", "fisher_batch_size")


class OptimizerUnavailable(RuntimeError):
    """The optimizer is registered but its factory is not in this install."""


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """How the experiments build and feed one optimizer.

    Attributes:
      label: the name shown in tables and plots.
      factory: ``factory(**hparams) -> optax.GradientTransformation``, or a
        string ``"module:attribute"`` resolved on first use.
      defaults: hyperparameters used when a run gives none (all tasks).
      extra_args: keyword arguments ``update`` needs besides the gradient,
        a subset of :data:`EXTRA_ARGS`.
      task_defaults: per task kind (``"classification"``, ``"autoencoder"``),
        hyperparameters that replace ``defaults``.
      tuned: task kinds whose defaults were tuned (README); the others are
        reasonable values from the papers / research notes, untuned.
      loop_defaults: default loop options (see :data:`LOOP_OPTIONS`).
      grid: the small grid searched by ``--grid`` (learning rate, damping).
      color: the colour of the method in plots.
    """

    label: str
    factory: Callable[..., optax.GradientTransformation] | str
    defaults: Mapping[str, Any]
    extra_args: tuple[str, ...] = ()
    task_defaults: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    tuned: tuple[str, ...] = ()
    loop_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    color: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.extra_args) - set(EXTRA_ARGS)
        if unknown:
            raise ValueError(f"{self.label}: unknown extra_args {sorted(unknown)}; known: {EXTRA_ARGS}")

    def resolve(self) -> Callable[..., optax.GradientTransformation]:
        """The factory callable; raises :class:`OptimizerUnavailable` if it is not installed."""
        if callable(self.factory):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise OptimizerUnavailable(
                f"{self.label} needs module {module_name!r}, which cannot be imported here ({err})"
            ) from err
        try:
            factory = getattr(module, attr)
        except AttributeError:
            raise OptimizerUnavailable(
                f"{self.label} needs {module_name}.{attr}, which this install of {module_name} does not provide "
                "(not implemented yet?)"
            ) from None
        # A module may say why a factory it defines cannot run here (e.g. peers.shampoo).
        why_not = getattr(module, f"{attr}_unavailable_reason", None)
        reason = why_not() if callable(why_not) else None
        if reason is not None:
            raise OptimizerUnavailable(f"{self.label} is unavailable here: {reason}")
        return factory

    def hparams_for(self, task_kind: str) -> dict[str, Any]:
        return {**self.defaults, **self.task_defaults.get(task_kind, {})}


# The KPSVD family: KFAC's tuned values, and the factors (a power SVD / Lanczos
# each) refreshed every 10 steps to amortise them (Koroko et al.'s driver: 100).
_KPSVD_DEFAULTS = {"learning_rate": 0.03, "damping": 0.1, "momentum": 0.9, "stats_period": 10, "inverse_period": 20}
_KPSVD_AE_DEFAULTS = {"learning_rate": 0.1, "damping": 10.0, "momentum": 0.9, "stats_period": 5, "inverse_period": 5,
                      "fisher": "sampled"}
_LR_DAMPING = {"learning_rate": [0.01, 0.03, 0.1, 0.3], "damping": [1e-3, 1e-2, 1e-1, 1.0]}

# Defaults: SOFIM, KFAC, SGD-m and Adam were tuned on the Fashion-MNIST MLP at
# batch 128 (README); KFAC's and Adam's autoencoder values come from
# tests/test_kfac_autoencoder.py (reduced Fashion-MNIST autoencoder, batch 500).
# On the autoencoder the KFAC/KPSVD family uses the sampled Fisher (Martens &
# Grosse; Koroko et al.), elsewhere the empirical one. Everything else is untuned: values from the
# papers / research notes (research/kpsvd_kbfgs.md §3.9, §4.3; sofim_mbf.md §1.7, §2.5).
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sofim": OptimizerSpec(
        "SOFIM", "sofim_optax:sofim", {"learning_rate": 5.0, "rho": 10.0, "b1": 0.9},
        tuned=("classification",),
        grid={"learning_rate": [0.1, 0.5, 1.0, 5.0], "rho": [0.5, 2.0, 10.0]}, color="tab:purple",
    ),
    "kfac": OptimizerSpec(
        "KFAC", "sofim_optax:kfac",
        {"learning_rate": 0.03, "damping": 0.1, "momentum": 0.9, "inverse_period": 20},
        extra_args=("layer_stats",),
        task_defaults={"autoencoder": {"learning_rate": 0.1, "damping": 10.0, "momentum": 0.9, "inverse_period": 5, "fisher": "sampled"}},
        tuned=("classification",),
        loop_defaults={"fisher": "empirical"},
        grid=_LR_DAMPING, color="tab:red",
    ),
    "kpsvd": OptimizerSpec(
        "KPSVD", "sofim_optax:kpsvd", _KPSVD_DEFAULTS,
        extra_args=("layer_stats",),
        task_defaults={"autoencoder": _KPSVD_AE_DEFAULTS},
        grid=_LR_DAMPING, color="tab:green",
    ),
    "kpsvd_deflation": OptimizerSpec(
        "Deflation", "sofim_optax:kpsvd_deflation", _KPSVD_DEFAULTS,
        extra_args=("layer_stats",),
        task_defaults={"autoencoder": _KPSVD_AE_DEFAULTS},
        grid=_LR_DAMPING, color="tab:pink",
    ),
    "kfac_corrected": OptimizerSpec(
        "KFAC-corrected", "sofim_optax:kfac_corrected", _KPSVD_DEFAULTS,
        extra_args=("layer_stats",),
        task_defaults={"autoencoder": _KPSVD_AE_DEFAULTS},
        grid=_LR_DAMPING, color="tab:blue",
    ),
    "kpsvd_lanczos": OptimizerSpec(
        "Lanczos", "sofim_optax:kpsvd_lanczos", _KPSVD_DEFAULTS,
        extra_args=("layer_stats",),
        task_defaults={"autoencoder": _KPSVD_AE_DEFAULTS},
        grid=_LR_DAMPING, color="black",
    ),
    "kbfgs": OptimizerSpec(
        "K-BFGS", "sofim_optax:kbfgs", {"learning_rate": 0.1, "damping": 0.3},
        extra_args=("layer_stats", "previous_batch_stats"),
        # The authors' MNIST demo uses lr 0.3; on the full Fashion-MNIST autoencoder (batch 1000)
        # lr 0.3 diverged within 20 steps at damping 0.3 and 1, lr 0.1 trained (README, K-BFGS).
        task_defaults={"autoencoder": {"learning_rate": 0.1, "damping": 0.3}},
        grid={"learning_rate": [0.03, 0.1, 0.3, 1.0], "damping": [0.03, 0.3, 3.0]}, color="tab:olive",
    ),
    "kbfgs_l": OptimizerSpec(
        "K-BFGS(L)", "sofim_optax:kbfgs_l", {"learning_rate": 0.1, "damping": 0.3},
        extra_args=("layer_stats", "previous_batch_stats"),
        task_defaults={"autoencoder": {"learning_rate": 0.1, "damping": 0.3}},  # as K-BFGS
        grid={"learning_rate": [0.03, 0.1, 0.3, 1.0], "damping": [0.03, 0.3, 3.0]}, color="tab:cyan",
    ),
    "mbf": OptimizerSpec(
        # Classification: probes on the MLP (first 20 000 images, 3 epochs, last-epoch training loss):
        # lr 0.03 / damping 0.1 gave 0.470, 1e-3 / 1e-2 0.358, 3e-3 / 1e-2 0.332 (not a full grid).
        "MBF", "sofim_optax:mini_block_fisher", {"learning_rate": 3e-3, "damping": 1e-2, "momentum": 0.9},
        extra_args=("layer_stats",),
        # Amortised refreshes (stats every 10, inverses every 100 steps) diverged within 12 steps on the
        # small autoencoder at lr 0.03; these values trained in notebooks/04 (untuned).
        task_defaults={"autoencoder": {"learning_rate": 0.01, "damping": 1.0, "momentum": 0.9, "stats_period": 1,
                                       "inverse_period": 5}},
        grid=_LR_DAMPING, color="tab:brown",
    ),
    "adahessian": OptimizerSpec(
        "AdaHessian", "sofim_optax:adahessian", {"learning_rate": 0.15, "hessian_power": 1.0},  # Yao et al.'s CIFAR value
        extra_args=("obj_fn",),
        grid={"learning_rate": [0.01, 0.05, 0.15, 0.5]}, color="tab:gray",
    ),
    "nystrom_sgd": OptimizerSpec(
        "Nyström-SGD", "sofim_optax:nystrom_sgd", {"learning_rate": 1.0, "rank": 10, "rho": 1e-3, "update_period": 100},
        extra_args=("obj_fn",),
        grid={"learning_rate": [0.1, 0.3, 1.0], "rho": [1e-3, 1e-2, 1e-1]}, color="goldenrod",
    ),
    "lbfgs": OptimizerSpec(
        "L-BFGS", "experiments.peers:lbfgs", {"memory_size": 10, "linesearch": "zoom", "max_linesearch_steps": 15},
        extra_args=("value_fn",),
        grid={"memory_size": [5, 10, 20]}, color="darkviolet",
    ),
    "shampoo": OptimizerSpec(
        "Shampoo", "experiments.peers:shampoo", {"learning_rate": 0.01},
        grid={"learning_rate": [0.003, 0.01, 0.03, 0.1]}, color="darkgreen",
    ),
    "sgdm": OptimizerSpec(
        "SGD-momentum", "experiments.peers:sgdm", {"learning_rate": 0.05, "momentum": 0.9},
        task_defaults={"autoencoder": {"learning_rate": 1e-3, "momentum": 0.9}},
        tuned=("classification",),
        grid={"learning_rate": [0.01, 0.03, 0.05, 0.1, 0.2]}, color="teal",
    ),
    "adam": OptimizerSpec(
        "Adam", optax.adam, {"learning_rate": 1e-3},
        task_defaults={"autoencoder": {"learning_rate": 3e-3}},
        tuned=("classification", "autoencoder"),
        grid={"learning_rate": [3e-4, 1e-3, 3e-3, 1e-2]}, color="tab:orange",
    ),
    "rmsprop": OptimizerSpec(
        "RMSprop", "experiments.peers:rmsprop", {"learning_rate": 1e-3},
        grid={"learning_rate": [1e-4, 3e-4, 1e-3, 3e-3]}, color="navy",
    ),
}
def available_optimizers(names: Sequence[str] | None = None) -> list[str]:
    """The registered optimizers (or those of ``names``) whose factory resolves in this install."""
    out = []
    for name in OPTIMIZERS if names is None else names:
        try:
            OPTIMIZERS[name].resolve()
        except OptimizerUnavailable:
            continue
        out.append(name)
    return out


def _accepts(fn: Callable, key: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def make_optimizer(
    name: str, task_kind: str = "classification", **overrides: Any
) -> tuple[OptimizerSpec, optax.GradientTransformation, dict[str, Any]]:
    """Builds the optimizer ``name`` with its defaults for ``task_kind`` updated by ``overrides``.

    Returns ``(spec, tx, hparams)``: ``hparams`` are the values used, loop
    options (:data:`LOOP_OPTIONS`) included. An untuned default that the
    factory does not accept is dropped with a logged warning (the other
    helpers' signatures may differ); an override it does not accept is an error.
    """
    try:
        spec = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}") from None
    factory = spec.resolve()
    defaults = spec.hparams_for(task_kind)
    hparams = {**spec.loop_defaults, **defaults, **overrides}
    kwargs = {k: v for k, v in hparams.items() if k not in LOOP_OPTIONS}
    for key in list(kwargs):
        if not _accepts(factory, key):
            if key in overrides:
                raise ValueError(f"{name}: the factory {getattr(factory, '__name__', factory)} takes no {key!r}")
            logger.warning("%s: default %s=%r dropped, the factory does not take it", name, key, kwargs[key])
            del kwargs[key], hparams[key]
    return spec, factory(**kwargs), hparams


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


# ---------------------------------------------------------------------------
# Tasks and data
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """What is learnt and measured.

    Attributes:
      kind: ``"classification"`` (softmax cross-entropy of integer labels,
        batch mean; metrics: training loss, test loss, test accuracy) or
        ``"autoencoder"`` (reconstruct the flattened input; metrics: training
        and test loss).
      reconstruction: autoencoder loss, ``"bernoulli"`` (sigmoid cross-entropy
        of the logits against the pixel intensities in [0, 1], summed over
        pixels, averaged over the batch: MNIST, CURVES, Fashion-MNIST) or
        ``"gaussian"`` (half the squared error summed over pixels, averaged
        over the batch: FACES), as in the K-BFGS paper (research §4.4).
      l2: coefficient ``τ`` of an added ``τ/2 ‖θ‖²`` on all parameters (K-BFGS
        paper: 1e-5). Reported losses are the data term only.
    """

    kind: str = "classification"
    reconstruction: str = "bernoulli"
    l2: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "autoencoder"):
            raise ValueError(f"task kind must be 'classification' or 'autoencoder', got {self.kind!r}")
        if self.reconstruction not in ("bernoulli", "gaussian"):
            raise ValueError(f"reconstruction must be 'bernoulli' or 'gaussian', got {self.reconstruction!r}")

    def data_loss(self, outputs: jax.Array, batch: tuple) -> jax.Array:
        """Batch-mean loss; uses :mod:`sofim_optax.curvature.losses` so a sampled Fisher can be drawn."""
        losses = sofim_optax.curvature.losses
        if self.kind == "classification":
            return losses.softmax_cross_entropy(outputs, batch[1])
        target = batch[0].reshape(batch[0].shape[0], -1)
        if self.reconstruction == "bernoulli":
            return losses.sigmoid_binary_cross_entropy(outputs, target)
        return losses.squared_error(outputs, target)

    def eval_sums(self, outputs: jax.Array, batch: tuple) -> tuple[jax.Array, jax.Array]:
        """(sum of per-example losses, number of correct predictions or 0)."""
        if self.kind == "classification":
            labels = batch[1]
            per = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), labels)
            return jnp.sum(per), jnp.sum(jnp.argmax(outputs, -1) == labels)
        target = batch[0].reshape(batch[0].shape[0], -1)
        z = outputs.astype(jnp.float32)
        if self.reconstruction == "bernoulli":
            per = jnp.sum(jax.nn.softplus(z) - z * target, axis=-1)
        else:
            per = 0.5 * jnp.sum((z - target) ** 2, axis=-1)
        return jnp.sum(per), jnp.zeros((), jnp.int32)


class Data(NamedTuple):
    """Arrays of one experiment. ``y_*`` are integer labels, or ``None`` for an autoencoder."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None


def _batch_of(x: np.ndarray, y: np.ndarray | None, idx: Any) -> tuple:
    return (x[idx],) if y is None else (x[idx], y[idx])


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class EpochMetrics:
    """Metrics after one epoch.

    ``train_loss`` is the mean of the epoch's minibatch losses (data term, at
    the parameters of each step); ``test_accuracy`` is ``None`` for an
    autoencoder. ``wall_time`` counts training steps only (not evaluation,
    checkpoints or compilation), cumulated over epochs.
    """

    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float | None
    wall_time: float
    mean_step_time: float
    steps: int = 0


@dataclasses.dataclass
class RunResult:
    optimizer: str
    label: str
    hparams: dict[str, Any]
    seed: int
    compile_time: float
    epochs: list[EpochMetrics]
    task: str = "classification"
    model: str = ""
    batch_size: int = 0
    tuned: str = "no"  # "defaults" (tuned defaults, no override), "grid" (picked by --grid), "no"
    resumed_from_epoch: int = 0
    diverged: bool = False
    # The final parameters and model state (not written to JSON).
    params: Any = dataclasses.field(default=None, repr=False, compare=False)
    model_state: Any = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in ("params", "model_state")}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _batches(num_examples: int, batch_size: int, seed: int, epoch: int):
    """Index arrays of the epoch's minibatches (the last partial batch is dropped)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    for start in range(0, num_examples - batch_size + 1, batch_size):
        yield order[start : start + batch_size]


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run with a different configuration."""


def _fingerprint(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _leaf_to_numpy(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def _leaf_from_numpy(value: np.ndarray, template: Any) -> Any:
    if isinstance(template, jax.Array) and jax.dtypes.issubdtype(template.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jnp.asarray(value), impl=jax.random.key_impl(template))
    if isinstance(template, (jax.Array, np.ndarray)):
        return jnp.asarray(value, dtype=template.dtype)
    if isinstance(template, (bool, int, float, np.generic)):
        return type(template)(value)
    return jnp.asarray(value)


def save_checkpoint(path: Path, tree: Any, meta: Mapping[str, Any], extra: Mapping[str, np.ndarray]) -> None:
    """Atomically writes ``tree``'s leaves, the JSON ``meta`` and ``extra`` arrays (flax msgpack)."""
    from flax import serialization

    leaves = jax.tree_util.tree_leaves(tree)
    payload = {
        "meta": json.dumps(meta, default=str),
        "leaves": {str(i): _leaf_to_numpy(leaf) for i, leaf in enumerate(leaves)},
        "extra": {k: np.asarray(v) for k, v in extra.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(serialization.msgpack_serialize(payload))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path, template: Any) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
    """Reads a checkpoint written by :func:`save_checkpoint` into the structure of ``template``."""
    from flax import serialization

    try:
        payload = serialization.msgpack_restore(path.read_bytes())
        meta = json.loads(payload["meta"])
        stored = payload["leaves"]
    except Exception as err:  # msgpack raises several types for a damaged file
        raise CheckpointMismatch(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(stored) != len(leaves):
        raise CheckpointMismatch(f"{path}: holds {len(stored)} arrays, this run's state has {len(leaves)}")
    restored = []
    for i, leaf in enumerate(leaves):
        value = np.asarray(stored[str(i)])
        if value.shape != np.shape(_leaf_to_numpy(leaf)):
            raise CheckpointMismatch(f"{path}: array {i} has shape {value.shape}, expected {np.shape(leaf)}")
        restored.append(_leaf_from_numpy(value, leaf))
    return jax.tree_util.tree_unflatten(treedef, restored), meta, dict(payload.get("extra", {}))


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------


def _split_variables(variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def _call_model(model: nn.Module, params: Any, model_state: Mapping[str, Any], x: jax.Array, train: bool):
    """Applies the model; returns (outputs, new model state)."""
    variables = {"params": params, **model_state}
    kwargs = {"train": train} if _takes_train(model) else {}
    if train and model_state:
        out, new_state = model.apply(variables, x, mutable=list(model_state), **kwargs)
        return out, dict(new_state)
    return model.apply(variables, x, **kwargs), dict(model_state)


def _takes_train(model: nn.Module) -> bool:
    try:
        return "train" in inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return False


def train(
    model: nn.Module,
    optimizer: str,
    data: Sequence[np.ndarray | None],
    *,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    hparams: Mapping[str, Any] | None = None,
    progress: bool = True,
    eval_batch_size: int = 2000,
    task: Task | str = "classification",
    model_name: str = "",
    checkpoint: str | os.PathLike | None = None,
    resume: bool = True,
    on_epoch_end: Callable[[RunResult], None] | None = None,
    stop_on_divergence: bool = True,
) -> RunResult:
    """Trains ``model`` with ``optimizer`` and evaluates on the test set after every epoch.

    Args:
      model: a Flax linen module mapping a batch to logits (classification) or
        reconstruction logits/means of the flattened input (autoencoder). If
        its ``__call__`` takes ``train``, it gets ``train=True`` in training
        steps and ``False`` in evaluation; variable collections other than
        ``params`` (``batch_stats``) are updated as mutable state.
      optimizer: a key of :data:`OPTIMIZERS`.
      data: ``(x_train, y_train, x_test, y_test)``: float32 inputs and int
        labels (``y_*`` ignored, may be ``None``, for an autoencoder).
      epochs: number of passes over the training set (the last partial batch
        of each pass is dropped).
      batch_size: examples per step.
      seed: seeds the initialisation, the batch order and the step keys.
      hparams: overrides of the optimizer's default hyperparameters (and of
        the loop options :data:`LOOP_OPTIONS`).
      progress: show a tqdm progress bar with the live loss.
      eval_batch_size: examples per evaluation call.
      task: a :class:`Task` or its kind.
      model_name: recorded in the result and the checkpoint fingerprint.
      checkpoint: a file written at the end of every epoch; with ``resume``
        an existing one (from the same configuration, else
        :class:`CheckpointMismatch`) is restored and training continues from
        its epoch.
      on_epoch_end: called with the result so far after every epoch (the CLIs
        write the JSON there).
      stop_on_divergence: stop after an epoch whose training loss is not finite.

    Returns:
      A :class:`RunResult` with one :class:`EpochMetrics` per epoch.
    """
    from tqdm.auto import tqdm  # optional dependency of the experiments

    task = Task(task) if isinstance(task, str) else task
    spec, tx, used = make_optimizer(optimizer, task.kind, **(hparams or {}))
    extra = set(spec.extra_args)
    fisher = used.get("fisher", "empirical")
    fisher_batch_size = used.get("fisher_batch_size")
    x_train, y_train, x_test, y_test = data
    if task.kind == "autoencoder":
        y_train = y_test = None
    elif y_train is None or y_test is None:
        raise ValueError("a classification task needs labels y_train and y_test")

    variables = model.init(jax.random.PRNGKey(seed), jnp.asarray(x_train[:1]))
    params, model_state = _split_variables(variables)
    opt_state = tx.init(params)
    base_key = jax.random.PRNGKey(seed)

    def loss_and_state(p, state, batch):
        out, new_state = _call_model(model, p, state, batch[0], train=True)
        loss = task.data_loss(out, batch)
        objective = loss
        if task.l2:
            objective = objective + 0.5 * task.l2 * sum(jnp.sum(jnp.square(w)) for w in jax.tree_util.tree_leaves(p))
        return objective, (loss, new_state)

    def stats_pass(p, state, batch, key):
        return sofim_optax.curvature.linen.value_grad_and_stats(
            loss_and_state, p, state, batch, has_aux=True, fisher=fisher,
            rng=key if fisher == "sampled" else None, fisher_batch_size=fisher_batch_size,
        )

    def train_step(p, state, opt_state, batch, prev_batch, step):
        key = jax.random.fold_in(base_key, step)
        kwargs: dict[str, Any] = {}
        if extra & {"layer_stats", "previous_batch_stats"}:
            (_, (loss, new_state)), grads, stats = stats_pass(p, state, batch, key)
            if "layer_stats" in extra:
                kwargs["layer_stats"] = stats
        else:
            (_, (loss, new_state)), grads = jax.value_and_grad(loss_and_state, has_aux=True)(p, state, batch)
        if "previous_batch_stats" in extra:
            if prev_batch is None:
                kwargs["previous_batch_stats"] = None
            else:
                _, _, kwargs["previous_batch_stats"] = stats_pass(p, state, prev_batch, jax.random.fold_in(key, 1))
        if extra & {"obj_fn", "value_fn"}:
            def obj_fn(q):
                return loss_and_state(q, state, batch)[0]
            if "obj_fn" in extra:
                kwargs["obj_fn"] = obj_fn
            if "value_fn" in extra:
                kwargs.update(value=loss if not task.l2 else obj_fn(p), grad=grads, value_fn=obj_fn)
        updates, opt_state = tx.update(grads, opt_state, p, **kwargs)
        return optax.apply_updates(p, updates), new_state, opt_state, loss

    @jax.jit
    def eval_batch(p, state, batch):
        out, _ = _call_model(model, p, state, batch[0], train=False)
        return task.eval_sums(out, batch)

    def evaluate(p, state):
        total_loss, correct = 0.0, 0
        for start in range(0, len(x_test), eval_batch_size):
            loss, hits = eval_batch(p, state, _batch_of(x_test, y_test, slice(start, start + eval_batch_size)))
            total_loss += float(loss)
            correct += int(hits)
        acc = correct / len(x_test) if task.kind == "classification" else None
        return total_loss / len(x_test), acc

    steps_per_epoch = len(x_train) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(x_train)} training examples")

    # Compiled before the first timed epoch (the first step of a method that
    # needs the previous batch has none: a second program), and only if an
    # epoch is left to run.
    jitted = jax.jit(train_step)
    compiled: dict[str, Any] = {}

    def compile_steps() -> float:
        example = _batch_of(x_train, y_train, slice(0, batch_size))
        t0 = time.perf_counter()
        step0 = jnp.asarray(0, jnp.int32)
        compiled["first"] = jitted.lower(params, model_state, opt_state, example, None, step0).compile()
        if "previous_batch_stats" in extra:
            compiled["next"] = jitted.lower(params, model_state, opt_state, example, example, step0).compile()
        return time.perf_counter() - t0

    result = RunResult(
        optimizer, spec.label, used, seed, 0.0, [], task=task.kind, model=model_name,
        batch_size=batch_size, tuned="defaults" if task.kind in spec.tuned and not hparams else "no",
    )
    config = {
        "optimizer": optimizer, "hparams": used, "seed": seed, "batch_size": batch_size, "task": dataclasses.asdict(task),
        "model": model_name or type(model).__name__, "n_train": len(x_train), "n_test": len(x_test),
    }
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    start_epoch, global_step, wall, prev_idx = 1, 0, 0.0, None
    if ckpt_path is not None and resume and ckpt_path.exists():
        (params, model_state, opt_state), meta, extra_arrays = load_checkpoint(ckpt_path, (params, model_state, opt_state))
        if meta.get("fingerprint") != _fingerprint(config):
            raise CheckpointMismatch(
                f"{ckpt_path}: written by a different configuration ({meta.get('config')}); "
                "delete it or choose another output folder"
            )
        result.epochs = [EpochMetrics(**e) for e in meta["history"]]
        start_epoch, global_step, wall = meta["epoch"] + 1, meta["step"], meta["wall"]
        prev_idx = extra_arrays.get("prev_idx")
        result.resumed_from_epoch = meta["epoch"]
        logger.info("%s: resumed from %s at epoch %d", optimizer, ckpt_path, meta["epoch"])

    for epoch in range(start_epoch, epochs + 1):
        if not compiled:
            result.compile_time = compile_steps()
        compiled_first, compiled_next = compiled["first"], compiled.get("next")
        losses = []
        bar = tqdm(
            _batches(len(x_train), batch_size, seed, epoch),
            total=steps_per_epoch,
            desc=f"{spec.label} epoch {epoch}/{epochs}",
            disable=not progress,
            leave=False,
        )
        t_start = time.perf_counter()
        for i, idx in enumerate(bar):
            batch = _batch_of(x_train, y_train, idx)
            step = jnp.asarray(global_step, jnp.int32)
            if prev_idx is None:
                params, model_state, opt_state, loss = compiled_first(params, model_state, opt_state, batch, None, step)
            else:
                prev = _batch_of(x_train, y_train, prev_idx)
                params, model_state, opt_state, loss = compiled_next(params, model_state, opt_state, batch, prev, step)
            if "previous_batch_stats" in extra:
                prev_idx = idx
            global_step += 1
            losses.append(loss)
            if progress and i % 20 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
        jax.block_until_ready(params)
        epoch_time = time.perf_counter() - t_start
        wall += epoch_time
        train_loss = float(jnp.mean(jnp.stack(losses)))
        test_loss, test_acc = evaluate(params, model_state)
        result.epochs.append(
            EpochMetrics(epoch, train_loss, test_loss, test_acc, wall, epoch_time / max(1, len(losses)), global_step)
        )
        diverged = not math.isfinite(train_loss)
        if ckpt_path is not None and not diverged:
            meta = {
                "config": config, "fingerprint": _fingerprint(config), "epoch": epoch, "step": global_step,
                "wall": wall, "history": [dataclasses.asdict(e) for e in result.epochs],
            }
            extras = {"prev_idx": prev_idx} if prev_idx is not None else {}
            save_checkpoint(ckpt_path, (params, model_state, opt_state), meta, extras)
        if on_epoch_end is not None:
            on_epoch_end(result)
        if diverged and stop_on_divergence:
            result.diverged = True
            break
    result.params, result.model_state = params, model_state
    return result
