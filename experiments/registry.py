"""The optimizer registry: how the experiments build each method and what its train step needs.

An :class:`OptimizerSpec` says how to build an optimizer from hyperparameters (its factory,
named lazily as ``"module:attribute"`` so that a method that has not landed in this install
fails only when it is selected), its default hyperparameters (per task kind, and whether they
were tuned), and which extra keyword arguments its ``update`` needs beyond the gradient
(:attr:`OptimizerSpec.needs`, read by :func:`experiments.step.make_train_step`):

==========================  ===============================================================
need                        what the train step passes to ``update``
==========================  ===============================================================
``layer_stats``             :func:`sofim_optax.curvature.linen.value_grad_and_stats` of the
                            current batch, from the SAME forward/backward pass as the
                            gradient (empirical Fisher, or the sampled Fisher with the loop
                            option ``fisher="sampled"``)
``previous_batch_stats``    the statistics of the PREVIOUS minibatch at the CURRENT
                            parameters (a second pass in the same step); on the very first
                            step the current batch's ``layer_stats`` (K-BFGS ignores them)
``obj_fn``                  ``obj_fn(params) -> scalar``: the training objective of the
                            current batch (a closure; batch-norm state is frozen)
``value_fn``                ``value=objective, grad=grads, value_fn=obj_fn`` (optax's
                            L-BFGS line search)
==========================  ===============================================================

:func:`make_optimizer` builds one entry; a default or an override that the factory does not
take is an error (:class:`ValueError`), never silently dropped. :func:`available_optimizers`
lists the entries whose factory resolves here; :func:`grid_points` expands a grid.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optax

from experiments.step import NEEDS

__all__ = [
    "OptimizerSpec",
    "OptimizerUnavailable",
    "OPTIMIZERS",
    "NEEDS",
    "LOOP_OPTIONS",
    "available_optimizers",
    "make_optimizer",
    "grid_points",
]

# Hyperparameter names that configure the train step (how statistics are computed) rather
# than the optimizer; they are taken out before the factory is called.
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
      needs: keyword arguments ``update`` needs besides the gradient, a subset
        of :data:`NEEDS`; the train step builder provides them.
      task_defaults: per task kind (``"classification"``, ``"autoencoder"``),
        hyperparameters that replace ``defaults``.
      tuned: task kinds whose defaults were tuned (docs/benchmarks.md); the others are
        reasonable values from the papers, untuned.
      loop_defaults: default loop options (see :data:`LOOP_OPTIONS`).
      grid: the small grid searched by ``--grid`` (learning rate, damping).
      color: the colour of the method in plots.
      l2_argument: the factory argument that must know the task's L2 coefficient ``τ``
        (the adaptive methods' ``l2_regularization``: the curvature of ``τ/2 ‖θ‖²``); the
        train loop sets it from the task unless a run gives it.
    """

    label: str
    factory: Callable[..., optax.GradientTransformation] | str
    defaults: Mapping[str, Any]
    needs: tuple[str, ...] = ()
    task_defaults: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    tuned: tuple[str, ...] = ()
    loop_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    color: str | None = None
    l2_argument: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"{self.label}: unknown needs {sorted(unknown)}; known: {NEEDS}")

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
                f"{self.label} needs {module_name}.{attr}, which this install of {module_name} "
                "does not provide (not implemented yet?)"
            ) from None
        # A module may say why a factory it defines cannot run here (e.g. peers.shampoo).
        why_not = getattr(module, f"{attr}_unavailable_reason", None)
        reason = why_not() if callable(why_not) else None
        if reason is not None:
            raise OptimizerUnavailable(f"{self.label} is unavailable here: {reason}")
        return factory

    def hparams_for(self, task_kind: str) -> dict[str, Any]:
        """The defaults of ``task_kind``: :attr:`defaults` updated by its :attr:`task_defaults`."""
        return {**self.defaults, **self.task_defaults.get(task_kind, {})}


# The KPSVD family: KFAC's tuned values, with the library's periods (the factors, a power
# SVD or Lanczos each, every 10 steps; Koroko et al.'s driver: 100).
_KPSVD_DEFAULTS = {
    "learning_rate": 0.03,
    "damping": 0.1,
    "momentum": 0.9,
}
_KPSVD_AE_DEFAULTS = {
    "learning_rate": 0.1,
    "damping": 10.0,
    "momentum": 0.9,
    "stats_period": 5,
    "inverse_period": 5,
    "fisher": "sampled",
}
_LR_DAMPING = {"learning_rate": [0.01, 0.03, 0.1, 0.3], "damping": [1e-3, 1e-2, 1e-1, 1.0]}


def _kpsvd_family_spec(label: str, alias: str, color: str) -> OptimizerSpec:
    """A member of the KPSVD family: the family's shared defaults, grid and needs."""
    return OptimizerSpec(
        label,
        f"sofim_optax:{alias}",
        _KPSVD_DEFAULTS,
        needs=("layer_stats",),
        task_defaults={"autoencoder": _KPSVD_AE_DEFAULTS},
        grid=_LR_DAMPING,
        color=color,
    )


# Defaults: SOFIM, KFAC, SGD-m and Adam were tuned on the Fashion-MNIST MLP at
# batch 128 (docs/benchmarks.md); KFAC's and Adam's autoencoder values come from
# tests/test_kfac_autoencoder.py (reduced Fashion-MNIST autoencoder, batch 500).
# On the autoencoder the KFAC/KPSVD family uses the sampled Fisher (Martens &
# Grosse; Koroko et al.), elsewhere the empirical one. Everything else is untuned: values
# from the K-BFGS, KPSVD, MBF and SOFIM papers, or reasonable choices where a paper gives none.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "sofim": OptimizerSpec(
        "SOFIM",
        "sofim_optax:sofim",
        {"learning_rate": 5.0, "damping": 10.0, "b1": 0.9},
        tuned=("classification",),
        grid={"learning_rate": [0.1, 0.5, 1.0, 5.0], "damping": [0.5, 2.0, 10.0]},
        color="tab:purple",
    ),
    "kfac": OptimizerSpec(
        "KFAC",
        "sofim_optax:kfac",
        {"learning_rate": 0.03, "damping": 0.1, "momentum": 0.9, "inverse_period": 20},
        needs=("layer_stats",),
        task_defaults={
            "autoencoder": {
                "learning_rate": 0.1,
                "damping": 10.0,
                "momentum": 0.9,
                "inverse_period": 5,
                "fisher": "sampled",
            }
        },
        tuned=("classification",),
        loop_defaults={"fisher": "empirical"},
        grid=_LR_DAMPING,
        color="tab:red",
    ),
    "kpsvd": _kpsvd_family_spec("KPSVD", "kpsvd", "tab:green"),
    "kpsvd_deflation": _kpsvd_family_spec("Deflation", "kpsvd_deflation", "tab:pink"),
    "kfac_corrected": _kpsvd_family_spec("KFAC-corrected", "kfac_corrected", "tab:blue"),
    "kpsvd_lanczos": _kpsvd_family_spec("Lanczos", "kpsvd_lanczos", "black"),
    "kbfgs": OptimizerSpec(
        "K-BFGS",
        "sofim_optax:kbfgs",
        {"learning_rate": 0.1, "damping": 0.3},
        needs=("layer_stats", "previous_batch_stats"),
        # The authors' MNIST demo uses lr 0.3; on the full Fashion-MNIST autoencoder (batch 1000)
        # lr 0.3 diverged within 20 steps at damping 0.3 and 1, lr 0.1 trained (docs/benchmarks.md, K-BFGS).
        task_defaults={"autoencoder": {"learning_rate": 0.1, "damping": 0.3}},
        grid={"learning_rate": [0.03, 0.1, 0.3, 1.0], "damping": [0.03, 0.3, 3.0]},
        color="tab:olive",
    ),
    "kbfgs_l": OptimizerSpec(
        "K-BFGS(L)",
        "sofim_optax:kbfgs_l",
        {"learning_rate": 0.1, "damping": 0.3},
        needs=("layer_stats", "previous_batch_stats"),
        task_defaults={"autoencoder": {"learning_rate": 0.1, "damping": 0.3}},  # as K-BFGS
        grid={"learning_rate": [0.03, 0.1, 0.3, 1.0], "damping": [0.03, 0.3, 3.0]},
        color="tab:cyan",
    ),
    "mbf": OptimizerSpec(
        # Classification: probes on the MLP (first 20 000 images, 3 epochs, last-epoch training loss):
        # lr 0.03 / damping 0.1 gave 0.470, 1e-3 / 1e-2 0.358, 3e-3 / 1e-2 0.332 (not a full grid).
        "MBF",
        "sofim_optax:mini_block_fisher",
        {"learning_rate": 3e-3, "damping": 1e-2, "gradient_momentum": 0.9},
        needs=("layer_stats",),
        # Amortised refreshes (stats every 10, inverses every 100 steps) diverged within 12 steps on the
        # small autoencoder at lr 0.03; these values trained in notebooks/04 (untuned).
        task_defaults={
            "autoencoder": {
                "learning_rate": 0.01,
                "damping": 1.0,
                "gradient_momentum": 0.9,
                "stats_period": 1,
                "inverse_period": 5,
            }
        },
        grid=_LR_DAMPING,
        color="tab:brown",
    ),
    "adahessian": OptimizerSpec(
        "AdaHessian",
        "sofim_optax:adahessian",
        {"learning_rate": 0.15, "hessian_power": 1.0},  # Yao et al.'s CIFAR value
        needs=("obj_fn",),
        grid={"learning_rate": [0.01, 0.05, 0.15, 0.5]},
        color="tab:gray",
    ),
    "nystrom_sgd": OptimizerSpec(
        "Nyström-SGD",
        "sofim_optax:nystrom_sgd",
        {"learning_rate": 1.0, "rank": 10, "damping": 1e-3, "stats_period": 100},
        needs=("obj_fn",),
        grid={"learning_rate": [0.1, 0.3, 1.0], "damping": [1e-3, 1e-2, 1e-1]},
        color="goldenrod",
    ),
    # The adaptive methods: learning rate, momentum and damping from the quadratic model
    # (sofim_optax.adaptive). One configuration for every task, nothing tuned: the library
    # defaults, with the curvature statistics of the layer-wise methods from the sampled
    # Fisher (the Gauss-Newton matrix the quadratic model measures).
    **{
        f"{name}_adaptive": OptimizerSpec(
            f"{label} (adaptive)",
            f"sofim_optax:{name}_adaptive",
            {},
            needs=needs + ("obj_fn",),
            loop_defaults={"fisher": "sampled"} if needs else {},
            color=color,
            l2_argument="l2_regularization",
        )
        for name, label, needs, color in (
            ("kfac", "KFAC", ("layer_stats",), "maroon"),
            ("kpsvd", "KPSVD", ("layer_stats",), "seagreen"),
            ("kpsvd_deflation", "Deflation", ("layer_stats",), "orchid"),
            ("kfac_corrected", "KFAC-corrected", ("layer_stats",), "royalblue"),
            ("kpsvd_lanczos", "Lanczos", ("layer_stats",), "slategray"),
            ("mbf", "MBF", ("layer_stats",), "sienna"),
            ("kbfgs", "K-BFGS", ("layer_stats", "previous_batch_stats"), "yellowgreen"),
            ("kbfgs_l", "K-BFGS(L)", ("layer_stats", "previous_batch_stats"), "cadetblue"),
            ("sofim", "SOFIM", (), "mediumpurple"),
            ("adahessian", "AdaHessian", (), "rosybrown"),
        )
    },
    "lbfgs": OptimizerSpec(
        "L-BFGS",
        "experiments.peers:lbfgs",
        {"memory_size": 10, "linesearch": "zoom", "max_linesearch_steps": 15},
        needs=("value_fn",),
        grid={"memory_size": [5, 10, 20]},
        color="darkviolet",
    ),
    # The peers a JAX user would pick instead (experiments/peers.py says how each is wired).
    # Muon: Keller Jordan's lr 0.02 for the matrices; its Adam part (biases, output layer) at
    # Adam's tuned learning rate of the task. The orthogonalised step does not scale with the
    # gradient, so one lr grid serves both tasks.
    "muon": OptimizerSpec(
        "Muon",
        "experiments.peers:muon",
        {"learning_rate": 0.02, "adam_learning_rate": 1e-3},
        task_defaults={"autoencoder": {"learning_rate": 0.02, "adam_learning_rate": 3e-3}},
        grid={"learning_rate": [0.005, 0.01, 0.02, 0.05]},
        color="crimson",
    ),
    # PSGD-Kron: psgd-jax's README says to start from Adam's settings, the learning rate
    # perhaps halved: half of Adam's tuned value per task; the rest are the package's defaults.
    "psgd_kron": OptimizerSpec(
        "PSGD-Kron",
        "experiments.peers:psgd_kron",
        {"learning_rate": 5e-4},
        task_defaults={"autoencoder": {"learning_rate": 1.5e-3}},
        grid={"learning_rate": [1e-4, 3e-4, 1e-3, 3e-3]},
        color="slateblue",
    ),
    # Shampoo: the usage example of the authors' scalable_shampoo README (see peers.shampoo),
    # weight decay 0. Grafted to SGD, so its learning rate is on SGD-momentum's scale: SGD-m's
    # defaults per task, and a grid that spans both tasks' scales.
    "shampoo": OptimizerSpec(
        "Shampoo",
        "experiments.peers:shampoo",
        {
            "learning_rate": 0.05,
            "block_size": 128,
            "beta1": 0.9,
            "beta2": 0.99,
            "matrix_epsilon": 1e-5,
            "exponent_override": 4,
            "start_preconditioning_step": 25,
            "preconditioning_compute_steps": 1,
            "graft_type": "sgd",
        },
        task_defaults={"autoencoder": {"learning_rate": 1e-3}},
        grid={"learning_rate": [1e-3, 3e-3, 0.01, 0.03, 0.1]},
        color="darkgreen",
    ),
    "sgdm": OptimizerSpec(
        "SGD-momentum",
        "experiments.peers:sgdm",
        {"learning_rate": 0.05, "momentum": 0.9},
        task_defaults={"autoencoder": {"learning_rate": 1e-3, "momentum": 0.9}},
        tuned=("classification",),
        grid={"learning_rate": [0.01, 0.03, 0.05, 0.1, 0.2]},
        color="teal",
    ),
    "adam": OptimizerSpec(
        "Adam",
        optax.adam,
        {"learning_rate": 1e-3},
        task_defaults={"autoencoder": {"learning_rate": 3e-3}},
        tuned=("classification", "autoencoder"),
        grid={"learning_rate": [3e-4, 1e-3, 3e-3, 1e-2]},
        color="tab:orange",
    ),
    "adamw": OptimizerSpec(
        "AdamW",
        optax.adamw,
        {"learning_rate": 1e-3, "weight_decay": 1e-4},
        grid={"learning_rate": [3e-4, 1e-3, 3e-3]},
        color="darkorange",
    ),
    "rmsprop": OptimizerSpec(
        "RMSprop",
        "experiments.peers:rmsprop",
        {"learning_rate": 1e-3},
        grid={"learning_rate": [1e-4, 3e-4, 1e-3, 3e-3]},
        color="navy",
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


def _parameter_names(factory: Callable) -> set[str] | None:
    """The keyword arguments ``factory`` takes, or ``None`` if it takes any (or cannot be read)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def make_optimizer(
    name: str, task_kind: str = "classification", **overrides: Any
) -> tuple[OptimizerSpec, optax.GradientTransformation, dict[str, Any]]:
    """Builds the optimizer ``name`` with its defaults for ``task_kind`` updated by ``overrides``.

    Returns ``(spec, tx, hparams)``: ``hparams`` are the values used, loop options
    (:data:`LOOP_OPTIONS`) included.

    Raises:
      ValueError: ``name`` is not registered, or a registry default or an override names an
        argument the factory does not take (the message names the optimizer and the argument).
      OptimizerUnavailable: the factory is not installed here.
    """
    try:
        spec = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}") from None
    factory = spec.resolve()
    hparams = {**spec.loop_defaults, **spec.hparams_for(task_kind), **overrides}
    kwargs = {k: v for k, v in hparams.items() if k not in LOOP_OPTIONS}
    accepted = _parameter_names(factory)
    if accepted is not None:
        for key in kwargs:
            if key not in accepted:
                origin = "override" if key in overrides else f"registry default ({task_kind})"
                raise ValueError(
                    f"optimizer {name!r}: the {origin} {key}={kwargs[key]!r} is not an argument of "
                    f"its factory {getattr(factory, '__name__', factory)} (takes {sorted(accepted)})"
                )
    return spec, factory(**kwargs), hparams


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every point of ``grid`` (name -> values), the first name varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
