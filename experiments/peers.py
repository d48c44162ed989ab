"""The first-order and quasi-Newton peers the papers compare against, as factories for the experiments.

Each is ``factory(**hparams) -> optax transformation``; the experiments'
registry (:data:`experiments.registry.OPTIMIZERS`) names them, with their
defaults and the extra ``update`` arguments the train loop computes for them:

=======  ======================================  ====================================
name     what                                    extra args the loop computes
=======  ======================================  ====================================
sgdm     ``optax.sgd`` with momentum              none
adam     ``optax.adam``                           none
rmsprop  ``optax.rmsprop``                        none
lbfgs    ``optax.lbfgs`` (zoom line search)       ``value``, ``grad``, ``value_fn``
=======  ======================================  ====================================

AdaHessian and Nyström-SGD are library methods (``sofim_optax.adahessian``,
``sofim_optax.nystrom_sgd``, extra argument ``obj_fn``) registered directly.

optax's L-BFGS takes the loss and gradient at ``params`` (``value``, ``grad``;
the line search reuses both) and ``value_fn(params) -> scalar``, which the
line search evaluates with its gradient at trial points (up to
``max_linesearch_steps`` extra evaluations per step). ``value_fn`` must be the
*same* minibatch objective as ``value``, otherwise the Wolfe conditions compare
different functions; the loop builds it inside the jitted step as a closure
over the batch.

Shampoo (``precondition-opt``, ``distributed_shampoo``) cannot run here: the
only PyPI release, ``precondition-opt`` 0.3.0 (pure Python, no declared
dependencies; it imports ``chex``, ``flax``, ``optax``), calls
``jax.tree_map``, ``jax.tree_flatten``/``jax.tree_unflatten`` and
``jax.experimental.pjit.with_sharding_constraint``, all removed from JAX well
before the 0.10.2 we support; ``distributed_shampoo(...).init`` fails with
``AttributeError: module 'jax' has no attribute 'tree_map'``. The upstream
GitHub sources are fixed, but no fixed release is on PyPI. :func:`shampoo`
is kept so that the harness can use it once a compatible release exists; it
raises a ``RuntimeError`` with this reason until then (see
:func:`shampoo_unavailable_reason`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

__all__ = ["sgdm", "adam", "rmsprop", "lbfgs", "shampoo", "shampoo_unavailable_reason"]


def _with_l2(
    weight_decay: float, tx: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    """L2 regularisation added to the gradient before ``tx`` (PyTorch's ``weight_decay``)."""
    if weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return optax.with_extra_args_support(tx)


def sgdm(
    learning_rate: float | optax.Schedule = 0.05,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """SGD with heavy-ball momentum; ``weight_decay`` is L2 added to the gradient (PyTorch style)."""
    return _with_l2(weight_decay, optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def adam(
    learning_rate: float | optax.Schedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Adam; ``weight_decay`` is L2 added to the gradient (PyTorch ``Adam``, not AdamW)."""
    return _with_l2(weight_decay, optax.adam(learning_rate, b1=b1, b2=b2, eps=eps))


def rmsprop(
    learning_rate: float | optax.Schedule = 1e-3,
    decay: float = 0.9,
    eps: float = 1e-8,
    momentum: float | None = None,
    centered: bool = False,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """RMSprop (optax: ε inside the square root, ``decay`` 0.9); ``weight_decay`` is L2."""
    return _with_l2(
        weight_decay,
        optax.rmsprop(learning_rate, decay=decay, eps=eps, momentum=momentum, centered=centered),
    )


def lbfgs(
    learning_rate: float | optax.Schedule | None = None,
    memory_size: int = 10,
    linesearch: str | None = "zoom",
    max_linesearch_steps: int = 15,
    scale_init_precond: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """optax's L-BFGS on minibatches.

    Needs ``value=``, ``grad=`` and ``value_fn=`` in ``update`` (see the module
    docstring). ``linesearch``: ``"zoom"`` (strong Wolfe, optax's default),
    ``"backtracking"`` (Armijo, ``store_grad=True`` so the gradient at the
    accepted point is reused) or ``None`` (no line search: then give a
    ``learning_rate``). With a line search, ``learning_rate`` defaults to
    ``None`` (the line search's step is used as is). Each step may cost up to
    ``max_linesearch_steps`` extra loss-and-gradient evaluations.
    """
    if linesearch == "zoom":
        ls = optax.scale_by_zoom_linesearch(max_linesearch_steps=max_linesearch_steps)
    elif linesearch == "backtracking":
        ls = optax.scale_by_backtracking_linesearch(
            max_backtracking_steps=max_linesearch_steps, store_grad=True
        )
    elif linesearch is None:
        if learning_rate is None:
            raise ValueError("lbfgs without a line search needs a learning_rate")
        ls = None
    else:
        raise ValueError(f"linesearch must be 'zoom', 'backtracking' or None, got {linesearch!r}")
    return optax.lbfgs(
        learning_rate, memory_size=memory_size, scale_init_precond=scale_init_precond, linesearch=ls
    )


def shampoo_unavailable_reason() -> str | None:
    """``None`` if ``precondition.distributed_shampoo`` imports and works with this JAX, else why not."""
    try:
        from precondition import distributed_shampoo as ds  # noqa: F401
    except ImportError as err:
        return f"precondition-opt is not installed ({err}); `pip install precondition-opt`"
    if not hasattr(jax, "tree_map"):
        return (
            "precondition-opt's distributed_shampoo calls jax.tree_map / jax.tree_flatten, which "
            f"JAX {jax.__version__} no longer has (removed in JAX 0.6); no compatible release on PyPI"
        )
    return None


def shampoo(
    learning_rate: float | optax.Schedule = 1e-3,
    block_size: int = 128,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """Distributed Shampoo from ``precondition-opt`` (Anil et al. 2020), when a compatible release exists.

    ``kwargs`` go to ``precondition.distributed_shampoo.distributed_shampoo``
    (e.g. ``beta1``, ``beta2``, ``preconditioning_compute_steps``,
    ``start_preconditioning_step``, ``graft_type``, ``weight_decay``). No extra
    args. Raises ``RuntimeError`` with the reason if it cannot run here.
    """
    reason = shampoo_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"Shampoo is unavailable: {reason}")
    from precondition import distributed_shampoo as ds

    return ds.distributed_shampoo(learning_rate, block_size, **kwargs)
