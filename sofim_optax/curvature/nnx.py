"""Curvature statistics from ``flax.nnx`` models, in one forward/backward pass.

NNX has no method-interception hook (``nnx.capture(..., method_outputs=...)``
records method *outputs* only, by patching classes globally, and
``Module.perturb`` needs the layer's own code to call it). So the adapter works
on a private copy of the model:

1. ``nnx.split(model, nnx.Param, ...)`` separates the parameters (what is
   differentiated) from the rest of the state.
2. Inside the differentiated function, ``nnx.merge`` builds a fresh copy. Every
   ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` / ``nnx.Embed``
   or normalisation-layer instance of the copy whose class does not override ``__call__`` has
   its ``__class__``
   switched to a cached subclass (which, for an ``Embed``, also captures ``attend`` calls)
   whose ``__call__`` records the input, runs the original ``__call__`` and
   adds the layer's zero perturbation. The classes are switched back before
   the function returns. The user's model object and the Flax classes are
   never modified; only the copy is, for the duration of the trace.
3. State updates made by ``loss_fn`` on the copy (BatchNorm statistics, RNG
   counters, ...) are split out and written back to the user's model with
   ``nnx.update``, as ``nnx.grad`` does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from sofim_optax.curvature import _capture, _layer_specs
from sofim_optax.curvature._capture import FisherType, LossReduction
from sofim_optax.curvature.stats import LayerStatsDict

__all__ = ["kernel_output_axes", "value_grad_and_stats"]

_LINEAR_CALL = nnx.Linear.__call__
_CONV_CALL = nnx.Conv.__call__
_LINEAR_GENERAL_CALL = nnx.LinearGeneral.__call__
_EINSUM_CALL = nnx.Einsum.__call__
_EMBED_CALL = nnx.Embed.__call__
_NORM_CLASSES = (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.BatchNorm, nnx.InstanceNorm)
_CAPTURED_CALLS = (
    _LINEAR_CALL,
    _CONV_CALL,
    _LINEAR_GENERAL_CALL,
    _EINSUM_CALL,
    _EMBED_CALL,
    *(cls.__call__ for cls in _NORM_CLASSES),
)
_PATHS_KEY = "nnx_paths"

_capturing_classes: dict[type, type] = {}
_capturing_lock = threading.Lock()


def _layer_spec(
    path: str, module: Any, inputs: Any, einsum_str: str | None = None
) -> _capture.LayerSpec:
    """Validates a captured NNX layer's options and returns its spec (``einsum_str``: an
    ``Einsum`` call's own equation, if given)."""
    name = type(module).__name__
    if isinstance(module, nnx.Embed):
        return _layer_specs.EmbedSpec(module.num_embeddings)
    if isinstance(module, nnx.Einsum):
        return _layer_specs.einsum_spec(
            path,
            name,
            equation=einsum_str if einsum_str is not None else module.einsum_str,
            input_ndim=len(inputs.shape),
            kernel_ndim=len(module.kernel.shape),
            custom_op=module.einsum_op is not jnp.einsum,
        )
    if isinstance(module, nnx.LinearGeneral):
        return _layer_specs.dense_general_spec(
            path,
            name,
            axis=module.axis,
            n_features=len(module.out_features),
            input_ndim=len(inputs.shape),
            batch_dims=tuple(module.batch_axis),
            custom_dot_general=module.dot_general is not None or module.dot_general_cls is not None,
        )
    if isinstance(module, nnx.Conv):
        return _layer_specs.conv_spec(
            path,
            name,
            kernel_size=module.kernel_size,
            strides=module.strides,
            padding=module.padding,
            input_dilation=module.input_dilation,
            kernel_dilation=module.kernel_dilation,
            feature_group_count=module.feature_group_count,
            has_mask=module.mask is not None,
            custom_conv=module.conv_general_dilated is not lax.conv_general_dilated,
        )
    return _layer_specs.dense_spec(
        path, name, custom_dot_general=module.dot_general is not lax.dot_general
    )


def _capturing_class(cls: type) -> type:
    """The cached subclass of ``cls`` whose ``__call__`` is captured.

    Args:
      cls: ``nnx.Linear``, ``nnx.Conv`` or a subclass that does not override
        ``__call__``.

    Returns:
      A subclass that differs from ``cls`` only by its ``__call__``.
    """
    with _capturing_lock:
        sub = _capturing_classes.get(cls)
        if sub is None:
            original = cls.__call__

            def __call__(self: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
                return _captured_call(self, original, inputs, args, kwargs)

            __call__.__doc__ = original.__doc__
            methods = {
                "__call__": __call__,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
            }
            if issubclass(cls, nnx.Embed):
                methods["attend"] = _noting_attend(cls.attend)
            sub = type(cls)(
                cls.__name__, (cls,), methods, pytree=getattr(cls, "_pytree__is_pytree", True)
            )
            _capturing_classes[cls] = sub
        return sub


def _noting_attend(original: Callable[..., Any]) -> Callable[..., Any]:
    """An ``Embed.attend`` whose call the capture records (the table is also a tied output
    head; see ``_capture.capture_attend``)."""

    def attend(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        session = _capture.current_session()
        table = session.scratch.get(_PATHS_KEY) if session is not None else None
        call = lambda: original(self, query, *args, **kwargs)  # noqa: E731
        if table is None or id(self) not in table:
            return call()
        return _capture.capture_attend(session, table[id(self)], query, call)

    attend.__doc__ = original.__doc__
    return attend


def _captured_call(
    module: Any, original: Callable[..., Any], inputs: Any, args: tuple, kwargs: dict
) -> Any:
    """Body of a captured layer's ``__call__``."""
    session = _capture.current_session()
    table = session.scratch.get(_PATHS_KEY) if session is not None else None
    if table is None:
        return original(module, inputs, *args, **kwargs)
    path = table.get(id(module))
    if path is None and isinstance(module, _NORM_CLASSES):
        return original(module, inputs, *args, **kwargs)  # (its fallback uses minibatch statistics)
    if path is None:
        raise _capture.CaptureError(
            f"An {type(module).__name__} layer of the model was called on a copy made inside a nested "
            "transformation within loss_fn (nnx.vmap / nnx.scan / nnx.remat / nnx.jit / ...). Capture only "
            "supports layers that run at the top level of loss_fn's trace."
        )
    call = lambda: original(module, inputs, *args, **kwargs)  # noqa: E731
    if isinstance(module, _NORM_CLASSES):
        return _norm_call(session, path, module, inputs, call)
    given = args[0] if args else kwargs.get("einsum_str")  # (an Einsum's call-time equation)
    spec = _layer_spec(path, module, inputs, given if isinstance(module, nnx.Einsum) else None)
    return _capture.capture_layer(session, path, spec, inputs, call)


def _norm_call(
    session: _capture.Session, path: str, module: Any, inputs: Any, call: Callable[[], Any]
) -> Any:
    """A normalisation layer's call: its scale and bias read here, the rest shared
    (``_capture.capture_normalisation``)."""
    parameters = {
        name: getattr(module, name)[...]
        for name in ("scale", "bias")
        if getattr(module, name, None) is not None
    }
    return _capture.capture_normalisation(session, path, module, inputs, parameters, call)


def _runner(
    loss_fn: Callable[..., Any], graphdef: Any, rest: Any, args: tuple
) -> Callable[[Any], tuple[Any, Any]]:
    """``run(params) -> (loss_fn output, updated non-parameter state)`` on a private copy of
    the model whose captured layers record their calls."""

    def run(p: Any) -> tuple[Any, Any]:
        session = _capture.current_session()
        assert session is not None
        # Rebuild the non-differentiated variables inside this trace so that
        # loss_fn may update them (NNX refuses updates across trace levels).
        copy = nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest))
        table: dict[int, str] = {}
        switched: list[tuple[Any, type]] = []
        for path, module in nnx.iter_modules(copy):
            cls = type(module)
            if getattr(cls, "__call__", None) in _CAPTURED_CALLS:
                table[id(module)] = "/".join(str(k) for k in path)
                object.__setattr__(module, "__class__", _capturing_class(cls))
                switched.append((module, cls))
        session.scratch[_PATHS_KEY] = table
        try:
            out = loss_fn(copy, *args)
        finally:
            for module, cls in switched:
                object.__setattr__(module, "__class__", cls)
        _, _, new_rest = nnx.split(copy, nnx.Param, ...)
        return out, new_rest

    return run


def value_grad_and_stats(
    loss_fn: Callable[..., Any],
    model: nnx.Module,
    *args: Any,
    has_aux: bool = False,
    fisher: FisherType = "empirical",
    rng: jax.Array | None = None,
    fisher_batch_size: int | None = None,
    loss_reduction: LossReduction = "mean",
) -> tuple[Any, Any, LayerStatsDict]:
    """Loss, gradient and per-layer curvature statistics of a ``flax.nnx`` model.

    ``value, grads, layer_stats = value_grad_and_stats(loss_fn, model, x, y)``
    returns ``value`` and ``grads`` as
    ``nnx.value_and_grad(loss_fn, has_aux=has_aux)(model, x, y)`` does (``grads``
    is an ``nnx.State`` of the model's ``nnx.Param`` variables), plus a
    :class:`~sofim_optax.curvature.LayerStats` for every ``nnx.Linear``,
    ``nnx.LinearGeneral`` (the projections of ``nnx.MultiHeadAttention`` included) and
    ``nnx.Conv`` of ``model`` that ``loss_fn`` calls, in ONE forward and ONE
    backward pass (plus a shape-only :func:`jax.eval_shape` trace that
    discovers the layers). Works inside :func:`jax.jit` / :func:`nnx.jit`.
    State updates made by ``loss_fn`` (BatchNorm statistics, RNG counters) are
    written back to ``model``; its parameters are not changed.

    Keys are the layer's NNX module path joined with ``"/"`` (e.g.
    ``"layers/0"`` or ``"encoder/linear1"``), the path of its ``kernel`` in
    ``nnx.state(model, nnx.Param)``; a root-level layer has the key ``""``.
    The statistics follow the same contract as
    :func:`sofim_optax.curvature.linen.value_grad_and_stats`:

    * ``Linear`` on ``(N, d_in)``: ``inputs (N, d_in)``, ``output_grads`` and
      ``outputs (N, d_out)``; on ``(N, L_1, ..., d_in)`` the middle axes are
      flattened into positions, ``(N, T, d)``.
    * ``LinearGeneral``: the contracted axes flattened into ``d_in``, the feature axes into
      ``d_out``, the other axes after ``N`` into positions, ``(N, T, ·)`` with ``T >= 1``
      (as ``DenseGeneral`` in the Linen adapter); ``batch_axis`` is refused.
    * ``Embed``: one-hot rows ``(N, [T,] V)``, output gradients ``(N, [T,] D)``; a table also
      used by ``attend`` gets statistics that combine both uses (kind ``"tied_embedding"``,
      as in the Linen adapter).
    * ``Einsum`` with a dense-map equation: as in the Linen adapter (other equations and a
      custom ``einsum_op`` are refused, naming the layer and the equation).
    * ``Conv`` (any number of spatial dimensions): ``inputs (N, T, k_1*...*k_d*c_in)``
      patches in the kernel's own order with the layer's strides, padding
      (``SAME``, ``SAME_LOWER``, ``VALID``, explicit, ``CIRCULAR``,
      ``REFLECT``, ``CAUSAL``) and dilations; ``output_grads`` and
      ``outputs (N, T, c_out)``. ``inputs @ kernel.reshape(-1, c_out) + bias == outputs``.
    * ``outputs`` are pre-activation; ``output_grads`` are ``N * dL/ds``
      (``loss_reduction="mean"``) or ``dL/ds`` (``"sum"``), or, with
      ``fisher="sampled"``, gradients of the per-example negative
      log-likelihood of a sampled target. Statistics are at least float32.

    Only instances of ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` /
    ``nnx.Embed`` and of the normalisation layers ``nnx.LayerNorm`` / ``nnx.RMSNorm`` /
    ``nnx.GroupNorm`` / ``nnx.BatchNorm`` / ``nnx.InstanceNorm`` (or subclasses that do not
    override ``__call__``) reachable from ``model`` are captured; a normalisation layer's
    statistics are of kind ``"scale_shift"``, as in
    :func:`sofim_optax.curvature.linen.value_grad_and_stats` (and, as there, a norm applied
    twice or inside a nested transformation gets none instead of being refused). Other
    parameters (``ConvTranspose``, layers passed in ``args``, ...) get gradients only.

    Refused, with an error naming the layer: a layer applied more than once in
    one forward pass (shared weights: the per-application statistics would be
    silently mixed); a captured layer called inside a nested transformation
    within ``loss_fn`` (``nnx.vmap``, ``nnx.scan``, ``nnx.remat``, ``jax.vmap``,
    ...); grouped/depthwise convolutions (``feature_group_count > 1``), kernel
    masks, custom ``dot_general`` / ``conv_general_dilated``, unknown padding
    strings, complex dtypes, inputs without a batch axis.

    ``loss_fn`` is traced twice (discovery, then the real pass) on private
    copies of ``model``. NNX objects inside ``args`` are passed as they are and
    must not be mutated by ``loss_fn`` (keep mutable state inside ``model``).

    Args:
      loss_fn: ``loss_fn(model, *args)`` returning a scalar loss, or
        ``(loss, aux)`` when ``has_aux``.
      model: the ``nnx.Module``; its ``nnx.Param`` variables are
        differentiated.
      *args: further arguments of ``loss_fn`` (data, targets); not
        differentiated.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``. Default ``False``.
      fisher: ``"empirical"`` (default, no extra cost) or ``"sampled"``
        (targets drawn from the model's predictive distribution registered by
        a :mod:`sofim_optax.curvature.losses` helper; needs ``rng``; the
        forward pass is shared and the VJP pulled back along a second
        cotangent). ``value`` and ``grads`` are always those of the real loss.
      rng: PRNG key, required for ``fisher="sampled"``; the ``i``-th registered
        helper call samples with ``jax.random.fold_in(rng, i)`` (see
        :func:`sofim_optax.curvature.linen.value_grad_and_stats`). Default
        ``None``.
      fisher_batch_size: keep the statistics (and, when sampled, draw targets)
        for the first ``M`` examples only. Default ``None`` (whole batch).
      loss_reduction: ``"mean"`` (default) or ``"sum"``: how ``loss_fn``
        reduces over the batch; sets the scale of empirical ``output_grads``.

    Returns:
      ``(value, grads, layer_stats)``.
    """
    options = _capture.capture_options(locals())  # handed over unchanged
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    run = _runner(loss_fn, graphdef, rest, args)
    value, grads, stats, new_rest = _capture.value_grad_and_stats(run, params, **options)
    nnx.update(model, new_rest)
    return value, grads, stats


def kernel_output_axes(
    loss_fn: Callable[..., Any], model: nnx.Module, *args: Any, has_aux: bool = False
) -> dict[str, int]:
    """How many output axes each ``LinearGeneral`` kernel that ``loss_fn`` calls has.

    The parameter tree alone cannot always tell a dense map over several axes from a
    convolution (a ``(heads, head_dim, d_model)`` kernel with a ``(d_model,)`` bias reads as
    either). Pass the result as the ``kernel_output_axes`` argument of a layer-wise method
    (``scale_by_kfac``, ``scale_by_mini_block_fisher``, ...) to make every such layer read as
    the dense map it is; Mini-Block Fisher needs it for attention's output projections, and
    every method for a bias-less ``LinearGeneral`` with several feature axes. One shape-only
    trace (:func:`jax.eval_shape`) on a private copy; ``model`` is not changed.

    Args:
      loss_fn: as for :func:`value_grad_and_stats`.
      model: the ``nnx.Module``.
      *args: further arguments of ``loss_fn``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``. Default ``False``.

    Returns:
      ``{layer path: number of feature axes}`` of every captured ``LinearGeneral``
      (including the projections inside attention).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    run = _runner(loss_fn, graphdef, rest, args)
    return _capture.kernel_output_axes(run, params, has_aux=has_aux)
