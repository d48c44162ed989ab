"""The first-order, quasi-Newton and preconditioned peers the papers compare against, as factories.

Each is ``factory(**hparams) -> optax transformation``; the experiments'
registry (:data:`experiments.registry.OPTIMIZERS`) names them, with their
defaults and the extra ``update`` arguments the train loop computes for them:

==========  ===================================================  ====================================
name        what                                                 extra args the loop computes
==========  ===================================================  ====================================
sgdm        ``optax.sgd`` with momentum                          none
adam        ``optax.adam``                                       none
rmsprop     ``optax.rmsprop``                                    none
lbfgs       ``optax.lbfgs`` (zoom line search)                   ``value``, ``grad``, ``value_fn``
muon        ``optax.contrib.muon`` (Adam for the other params)   none
psgd_kron   ``psgd_jax.kron.kron`` (PSGD-Kron, ``psgd-jax``)     none
shampoo     ``precondition.distributed_shampoo`` (Shampoo)       none
==========  ===================================================  ====================================

AdaHessian and Nyström-SGD are library methods (``sofim_optax.adahessian``,
``sofim_optax.nystrom_sgd``, extra argument ``obj_fn``) registered directly.

optax's L-BFGS takes the loss and gradient at ``params`` (``value``, ``grad``;
the line search reuses both) and ``value_fn(params) -> scalar``, which the
line search evaluates with its gradient at trial points (up to
``max_linesearch_steps`` extra evaluations per step). ``value_fn`` must be the
*same* minibatch objective as ``value``, otherwise the Wolfe conditions compare
different functions; the loop builds it inside the jitted step as a closure
over the batch.

**Muon** is optax's own (:func:`muon`): the Newton-Schulz orthogonalised momentum on the
weight matrices, Adam on the rest. optax sends every 2-D parameter to Muon and everything
else to Adam, which would leave a CNN's 4-D convolution kernels with Adam; :func:`muon`
orthogonalises those too, as the kernel flattened to (height x width x input channels,
output channels), the way Muon's authors treat convolution filters. Following them, the
output layer (classifier head, or the autoencoder's reconstruction layer) goes to Adam as
well (``adam_for_output_layer``).

**PSGD-Kron** and **Shampoo** come from third-party packages (the ``experiments`` extra
pins both), neither of which imports or runs unchanged on our JAX 0.10.2 / optax 0.2.8.
Each gets a small compatibility shim, applied only where it is needed, that restores names
the package expects and never changes what it computes:

* ``psgd-jax`` 0.2.9 (its latest release) imports ``optax._src.clipping``, a module optax
  has since moved to ``optax.transforms._clipping``; ``kron`` never uses it. While
  ``psgd_jax.kron`` is imported, :func:`psgd_kron` registers the moved module under the
  old name (and removes the alias again afterwards). 0.2.8 would import as is, but lacks
  0.2.9's cap on the RMS of the preconditioned gradient, so we use the latest.
* ``precondition-opt`` 0.3.0 (the only release with ``distributed_shampoo``; the GitHub
  sources are fixed, but no fixed release is on PyPI, and the older ``optax-shampoo`` copy
  has the same problem) imports on our JAX but, when called, uses ``jax.tree_map``,
  ``jax.tree_flatten``, ``jax.tree_unflatten`` (removed in JAX 0.6) and
  ``jax.experimental.pjit.with_sharding_constraint``. :func:`shampoo` rebinds the module's
  own ``jax`` and ``pjit`` names to stand-ins that add these four as aliases of
  ``jax.tree.map``, ``jax.tree.flatten``, ``jax.tree.unflatten`` and
  ``jax.lax.with_sharding_constraint`` (the functions the removed names were aliases of),
  and forward every other attribute to the real module; the process's ``jax`` is not
  touched. The sharding constraint is only used in its multi-device (pjit) mode, which
  the harness does not use. tests/test_harness.py checks Shampoo's updates against a
  NumPy implementation of the algorithm.

A pinned environment with an older JAX (as kfac-jax needs) was not needed for either.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import io
import logging
import re
import sys
import types
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import optax
from optax.contrib import MuonDimensionNumbers

__all__ = [
    "sgdm",
    "adam",
    "rmsprop",
    "lbfgs",
    "muon",
    "psgd_kron",
    "psgd_kron_unavailable_reason",
    "shampoo",
    "shampoo_unavailable_reason",
]

logger = logging.getLogger(__name__)


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


# Flax linen names a module's dense layers Dense_0, Dense_1, ...: the highest index is the output layer.
_DENSE_NAME = re.compile(r"Dense_(\d+)")


def _output_layer_name(params: Any) -> str | None:
    """The top-level ``Dense_<i>`` entry with the highest ``i`` (the output layer), if any."""
    if not isinstance(params, Mapping):
        return None
    dense = [
        (int(m.group(1)), k)
        for k in params
        if isinstance(k, str) and (m := _DENSE_NAME.fullmatch(k))
    ]
    return max(dense)[1] if dense else None


def _muon_dimension_numbers(params: Any, adam_for_output_layer: bool) -> Any:
    """Which parameters Muon orthogonalises, and how; ``None`` sends a parameter to Adam.

    2-D kernels ``(in, out)`` are matrices as they are; 4-D convolution kernels ``(h, w, in,
    out)`` are the matrix ``(h * w * in, out)``; everything else (biases, norm scales) and,
    with ``adam_for_output_layer``, the output layer's kernel go to Adam.
    """
    head = _output_layer_name(params) if adam_for_output_layer else None

    def dims(path, x):
        if head is not None and path and getattr(path[0], "key", None) == head:
            return None
        if x.ndim == 2:
            return MuonDimensionNumbers(reduction_axis=0, output_axis=1)
        if x.ndim == 4:
            return MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
        return None

    return jax.tree_util.tree_map_with_path(dims, params)


def muon(
    learning_rate: float | optax.Schedule = 0.02,
    adam_learning_rate: float | optax.Schedule = 1e-3,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    adam_b1: float = 0.9,
    adam_b2: float = 0.999,
    adam_for_output_layer: bool = True,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """Muon (``optax.contrib.muon``) on the weight matrices and convolution kernels, Adam on the rest.

    ``learning_rate`` is Muon's (0.02, Keller Jordan's default for hidden matrices),
    ``adam_learning_rate`` that of the Adam part (biases, norm scales and, with
    ``adam_for_output_layer``, the output layer; optax's Adam part uses Nesterov momentum when
    ``nesterov`` is set). Convolution kernels are orthogonalised as ``(h * w * in, out)``
    matrices (optax's default would give them to Adam). ``weight_decay`` is decoupled (AdamW
    style, multiplied by the learning rate) and applies to both parts, as in optax, not L2
    added to the gradient as in :func:`sgdm`. No extra args.
    """
    return optax.contrib.muon(
        learning_rate,
        ns_steps=ns_steps,
        beta=beta,
        weight_decay=weight_decay,
        nesterov=nesterov,
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        adam_weight_decay=weight_decay,
        adam_learning_rate=adam_learning_rate,
        muon_weight_dimension_numbers=functools.partial(
            _muon_dimension_numbers, adam_for_output_layer=adam_for_output_layer
        ),
    )


# ----------------------------------------------------------------------------------------------
# PSGD-Kron (psgd-jax)
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _moved_optax_clipping() -> Iterator[None]:
    """``optax._src.clipping`` under its old name while the block runs (psgd-jax 0.2.9 imports it)."""
    old_name = "optax._src.clipping"
    if old_name in sys.modules or importlib.util.find_spec(old_name) is not None:
        yield
        return
    from optax.transforms import _clipping

    sys.modules[old_name] = _clipping
    try:
        yield
    finally:
        sys.modules.pop(old_name, None)


def _import_psgd_kron() -> types.ModuleType:
    with _moved_optax_clipping():
        return importlib.import_module("psgd_jax.kron")


def psgd_kron_unavailable_reason() -> str | None:
    """``None`` if ``psgd_jax.kron`` imports here (with the shim of the module docstring), else why not."""
    if importlib.util.find_spec("psgd_jax") is None:
        return "psgd-jax is not installed; `pip install psgd-jax==0.2.9`"
    try:
        _import_psgd_kron()
    except ImportError as err:
        return f"psgd_jax.kron does not import with optax {optax.__version__}: {err}"
    return None


def psgd_kron(
    learning_rate: float | optax.Schedule = 1e-3,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    preconditioner_lr: float = 0.1,
    max_size_triangular: int = 8192,
    min_ndim_triangular: int = 2,
    memory_save_mode: str | None = None,
    min_update_probability: float = 0.03,
    update_probability_flat_steps: int = 500,
) -> optax.GradientTransformationExtraArgs:
    """PSGD-Kron (Li; Walters' ``psgd-jax``): momentum preconditioned by learned Kronecker factors.

    The arguments are ``psgd_jax.kron.kron``'s, with its defaults; the preconditioner is
    updated with probability 1 for the first ``update_probability_flat_steps`` steps, then
    with a probability that decays exponentially to ``min_update_probability`` (the package's
    ``precond_update_prob_schedule``; numbers here rather than a function, so that the
    hyperparameters stay JSON). A dimension larger than ``max_size_triangular``, and every
    dimension of a parameter with fewer than ``min_ndim_triangular`` dimensions (biases),
    gets a diagonal factor, the others a triangular one. ``weight_decay`` is decoupled
    (AdamW style). No extra args. Raises ``RuntimeError`` if psgd-jax cannot run here.
    """
    reason = psgd_kron_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"PSGD-Kron is unavailable: {reason}")
    kron = _import_psgd_kron()
    schedule = kron.precond_update_prob_schedule(
        min_prob=min_update_probability, flat_start=update_probability_flat_steps
    )
    tx = kron.kron(
        learning_rate=learning_rate,
        b1=b1,
        weight_decay=weight_decay,
        preconditioner_update_probability=schedule,
        max_size_triangular=max_size_triangular,
        min_ndim_triangular=min_ndim_triangular,
        memory_save_mode=memory_save_mode,
        preconditioner_lr=preconditioner_lr,
    )

    def init(params):
        # kron's init prints the sizes of its state; they go to the log, not to our stdout.
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            state = tx.init(params)
        for line in printed.getvalue().splitlines():
            logger.debug("psgd-jax: %s", line)
        return state

    return optax.GradientTransformationExtraArgs(init, tx.update)


# ----------------------------------------------------------------------------------------------
# Shampoo (precondition-opt)
# ----------------------------------------------------------------------------------------------


class _JaxWithRemovedTreeAliases(types.ModuleType):
    """``jax`` plus the aliases ``jax.tree_map``, ``jax.tree_flatten``, ``jax.tree_unflatten``."""

    tree_map = staticmethod(jax.tree.map)
    tree_flatten = staticmethod(jax.tree.flatten)
    tree_unflatten = staticmethod(jax.tree.unflatten)

    def __getattr__(self, name: str) -> Any:
        return getattr(jax, name)


def _distributed_shampoo_module() -> types.ModuleType:
    """``precondition.distributed_shampoo``, with the shim of the module docstring where it needs it."""
    from precondition import distributed_shampoo as ds

    if not hasattr(ds.jax, "tree_map"):
        ds.jax = _JaxWithRemovedTreeAliases("jax")
    if not hasattr(ds.pjit, "with_sharding_constraint"):
        ds.pjit = types.SimpleNamespace(with_sharding_constraint=jax.lax.with_sharding_constraint)
    return ds


def shampoo_unavailable_reason() -> str | None:
    """``None`` if ``precondition.distributed_shampoo`` imports here, else why not."""
    try:
        _distributed_shampoo_module()
    except ImportError as err:
        return f"precondition-opt is not installed ({err}); `pip install precondition-opt==0.3.0`"
    return None


def _quiet_float64_request(fn):
    """Runs ``fn`` without the warning that the inverse root's float64 falls back to float32.

    distributed_shampoo asks for float64 in its inverse p-th root and documents that it runs in
    float32 unless ``jax_enable_x64`` is set; JAX warns about that at every trace.
    """

    @functools.wraps(fn)
    def quiet(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="Explicitly requested dtype float64", category=UserWarning
            )
            return fn(*args, **kwargs)

    return quiet


def shampoo(
    learning_rate: float | optax.Schedule = 0.05,
    block_size: int = 128,
    beta1: float = 0.9,
    beta2: float = 0.99,
    matrix_epsilon: float = 1e-5,
    exponent_override: int = 4,
    start_preconditioning_step: int = 25,
    preconditioning_compute_steps: int = 1,
    statistics_compute_steps: int = 1,
    graft_type: str = "sgd",
    nesterov: bool = True,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """Distributed Shampoo (Anil et al. 2020) from ``precondition-opt``, on one device.

    The defaults are the usage example of the authors' README (google-research
    ``scalable_shampoo``; ``precondition-opt``'s own README gives none): blocks of at most
    128, β₁ 0.9, β₂ 0.99, matrix ε 1e-5 (relative to the largest eigenvalue), exponent 4,
    the grafted method's plain steps for the first 25 steps, preconditioners recomputed every
    step, layer-wise grafting to SGD's step size, Nesterov momentum; but ``weight_decay`` 0
    (theirs 1e-4) as for every other peer. The README leaves the learning rate to the user:
    with SGD grafting each layer's step has the norm of SGD-momentum's, so the default 0.05 is
    SGD-momentum's tuned value. Small dimensions are merged as the package does by default
    (``merge_small_dims_block_size`` 4096): a 128 x 10 output kernel, say, is preconditioned
    as a vector of 1280 in full-matrix blocks of 128.

    ``graft_type`` is a name of ``GraftingType`` in lower case (``"sgd"``, ``"adagrad"``,
    ``"rmsprop"``, ``"rmsprop_normalized"``, ...). ``kwargs`` go to
    ``distributed_shampoo`` (e.g. ``merge_small_dims_block_size``, ``decoupled_weight_decay``).
    No extra args. Raises ``RuntimeError`` if precondition-opt is not installed.
    """
    reason = shampoo_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"Shampoo is unavailable: {reason}")
    ds = _distributed_shampoo_module()
    try:
        graft = ds.GraftingType[graft_type.upper()]
    except KeyError:
        names = sorted(g.name.lower() for g in ds.GraftingType)
        raise ValueError(f"graft_type must be one of {names}, got {graft_type!r}") from None
    tx = ds.distributed_shampoo(
        learning_rate,
        block_size,
        beta1=beta1,
        beta2=beta2,
        matrix_epsilon=matrix_epsilon,
        exponent_override=exponent_override,
        start_preconditioning_step=start_preconditioning_step,
        preconditioning_compute_steps=preconditioning_compute_steps,
        statistics_compute_steps=statistics_compute_steps,
        graft_type=graft,
        nesterov=nesterov,
        weight_decay=weight_decay,
        **kwargs,
    )
    return optax.GradientTransformation(
        _quiet_float64_request(tx.init), _quiet_float64_request(tx.update)
    )
