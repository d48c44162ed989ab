"""Curvature statistics from ``flax.linen`` models, in one forward/backward pass.

Interception: :func:`flax.linen.intercept_methods` wraps every module method
call while the user's loss runs. The interceptor acts only when the method
being run is exactly ``flax.linen.Dense.__call__``, ``flax.linen.DenseGeneral.__call__``,
``flax.linen.Einsum.__call__``, ``flax.linen.Embed.__call__``, the shared-weight
``flax.linen.Conv.__call__`` or the ``__call__`` of a normalisation layer (so a subclass that
overrides ``__call__`` and calls ``super().__call__`` is captured at the super call, and a subclass whose
own ``__call__`` does something else is left alone). For such a call it records
the layer input (for a normalisation layer, its normalised input; see
``_capture.capture_scale_shift``), runs the layer, and returns ``output + perturbation`` where
``perturbation`` is a zero array that :func:`jax.vjp` differentiates together
with the parameters. The model is not edited and no variable collection is
added: the perturbations are closed-over arrays, not Flax variables. Any ``attend`` call of
an ``Embed`` (a tied output head) is captured too, its logits perturbed the same way (see
``_capture.capture_attend``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax.linen.module import InterceptorContext

from sofim_optax.curvature import _capture, _layer_specs
from sofim_optax.curvature._capture import FisherType, LossReduction
from sofim_optax.curvature.stats import LayerStatsDict

__all__ = ["kernel_output_axes", "value_grad_and_stats"]


def _raw(method: Any) -> Any:
    """The undecorated function behind a Linen-wrapped method."""
    return getattr(method, "__wrapped__", method)


_DENSE_CALL = _raw(nn.Dense.__call__)
_CONV_CALL = _raw(nn.Conv.__call__)  # ``_Conv.__call__``, also used by ConvLocal
_DENSE_GENERAL_CALL = _raw(nn.DenseGeneral.__call__)
_EINSUM_CALL = _raw(nn.Einsum.__call__)
_EMBED_CALL = _raw(nn.Embed.__call__)
_NORM_CALLS = {
    _raw(cls.__call__): cls
    for cls in (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm, nn.InstanceNorm)
}


def _dense_spec(path: str, module: nn.Dense) -> _layer_specs.DenseSpec:
    return _layer_specs.dense_spec(
        path,
        type(module).__name__,
        custom_dot_general=module.dot_general is not None or module.dot_general_cls is not None,
    )


def _dense_general_spec(
    path: str, module: nn.DenseGeneral, inputs: Any
) -> _layer_specs.DenseGeneralSpec:
    features = module.features
    return _layer_specs.dense_general_spec(
        path,
        type(module).__name__,
        axis=module.axis,
        n_features=1 if isinstance(features, int) else len(features),
        input_ndim=len(inputs.shape),
        batch_dims=(module.batch_dims,)
        if isinstance(module.batch_dims, int)
        else module.batch_dims,
        custom_dot_general=module.dot_general is not None or module.dot_general_cls is not None,
    )


def _conv_spec(path: str, module: nn.Conv) -> _layer_specs.ConvSpec:
    return _layer_specs.conv_spec(
        path,
        type(module).__name__,
        kernel_size=module.kernel_size,
        strides=module.strides,
        padding=module.padding,
        input_dilation=module.input_dilation,
        kernel_dilation=module.kernel_dilation,
        feature_group_count=module.feature_group_count,
        has_mask=module.mask is not None,
        custom_conv=module.conv_general_dilated is not None
        or module.conv_general_dilated_cls is not None,
    )


def _norm_call(
    session: _capture.Session,
    path: str,
    module: nn.Module,
    inputs: Any,
    call: Callable[[], Any],
) -> Any:
    """A normalisation layer's call: its scale and bias read here, the rest shared
    (``_capture.capture_normalisation``)."""
    parameters = {
        name: module.get_variable("params", name)
        for name in ("scale", "bias")
        if getattr(module, f"use_{name}", False)
    }
    return _capture.capture_normalisation(session, path, module, inputs, parameters, call)


def _make_interceptor(session_getter: Callable[[], _capture.Session | None]) -> Callable[..., Any]:
    """Builds the method interceptor of one capture.

    Args:
      session_getter: returns the session this interceptor serves, or ``None``
        when that capture is not the innermost active one (then the interceptor
        passes the call through).

    Returns:
      A Linen method interceptor.
    """

    def interceptor(
        next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: InterceptorContext
    ) -> Any:
        session = session_getter()
        if session is None or context.method_name not in ("__call__", "attend"):
            return next_fun(*args, **kwargs)
        func = getattr(context.orig_method, "func", None)
        module = context.module
        path = "/".join(str(p) for p in module.path)
        if context.method_name == "attend" and isinstance(module, nn.Embed):
            query = args[0] if args else kwargs.get("query")
            return _capture.capture_attend(session, path, query, lambda: next_fun(*args, **kwargs))
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else kwargs.get("x")
        norm_cls = _NORM_CALLS.get(func)
        if norm_cls is not None and isinstance(module, norm_cls):
            return _norm_call(session, path, module, inputs, lambda: next_fun(*args, **kwargs))
        inputs = args[0] if args else kwargs.get("inputs")
        if func is _EMBED_CALL and isinstance(module, nn.Embed):
            spec: _capture.LayerSpec = _layer_specs.EmbedSpec(module.num_embeddings)
        elif func is _DENSE_CALL and isinstance(module, nn.Dense):
            spec = _dense_spec(path, module)
        elif func is _CONV_CALL and isinstance(module, nn.Conv):
            spec = _conv_spec(path, module)
        elif func is _DENSE_GENERAL_CALL and isinstance(module, nn.DenseGeneral):
            spec = _dense_general_spec(path, module, inputs)
        elif func is _EINSUM_CALL and isinstance(module, nn.Einsum):
            given = args[1] if len(args) > 1 else kwargs.get("einsum_str")
            spec = _layer_specs.einsum_spec(
                path,
                type(module).__name__,
                equation=given if given is not None else module.einsum_str,
                input_ndim=len(inputs.shape),
                kernel_ndim=len(module.shape),
                custom_op=False,
            )
        else:
            return next_fun(*args, **kwargs)
        return _capture.capture_layer(
            session, path, spec, inputs, lambda: next_fun(*args, **kwargs)
        )

    return interceptor


def _runner(loss_fn: Callable[..., Any], args: tuple) -> Callable[[Any], tuple[Any, None]]:
    """``run(params)``: ``loss_fn(params, *args)`` with this capture's interceptor installed."""

    def run(p: Any) -> tuple[Any, None]:
        session = _capture.current_session()
        interceptor = _make_interceptor(
            lambda: session if _capture.current_session() is session else None
        )
        with nn.intercept_methods(interceptor):
            out = loss_fn(p, *args)
        return out, None

    return run


def value_grad_and_stats(
    loss_fn: Callable[..., Any],
    params: Any,
    *args: Any,
    has_aux: bool = False,
    fisher: FisherType = "empirical",
    rng: jax.Array | None = None,
    fisher_batch_size: int | None = None,
    loss_reduction: LossReduction = "mean",
) -> tuple[Any, Any, LayerStatsDict]:
    """Loss, gradient and per-layer curvature statistics of a ``flax.linen`` model.

    ``value, grads, layer_stats = value_grad_and_stats(loss_fn, params, x, y)``
    returns what ``jax.value_and_grad(loss_fn, has_aux=has_aux)(params, x, y)``
    returns, plus a :class:`~sofim_optax.curvature.LayerStats` for every
    ``flax.linen.Dense``, ``flax.linen.DenseGeneral`` and ``flax.linen.Conv`` call made
    by ``loss_fn`` (the projections of ``MultiHeadDotProductAttention`` included), at
    any depth of nesting, computed in ONE forward and ONE backward pass (plus a
    shape-only :func:`jax.eval_shape` trace that discovers the layers; it
    computes nothing). Works inside the user's :func:`jax.jit`.

    Each statistic is keyed by the layer's module path joined with ``"/"``
    (e.g. ``"Encoder_0/Dense_1"``), the path at which its ``kernel`` (and
    ``bias``) sit in ``params["params"]`` (or in ``params`` if ``loss_fn``
    passes ``{"params": params}`` to ``apply``); a root-level layer has the key
    ``""``. Per layer, with ``N`` the leading (batch) axis of its input:

    * ``Dense`` on ``(N, d_in)``: ``inputs (N, d_in)``, ``output_grads`` and
      ``outputs (N, d_out)``. On ``(N, L_1, ..., d_in)`` the middle axes are
      flattened into positions like a convolution's: ``(N, T, d)``,
      ``T = L_1 * ...``.
    * ``DenseGeneral`` (contracted ``axis``, ``features``): the contracted axes flattened
      into ``d_in`` and the feature axes into ``d_out``, in the kernel's own order, so that
      ``inputs @ kernel.reshape(d_in, d_out) + bias.reshape(d_out) == outputs``; the input's
      other axes after ``N`` become positions: ``(N, T, d_in)`` and ``(N, T, d_out)``, with
      ``T = 1`` when there are none (``(N, d)`` only for a plain ``(N, d_in) → (N, d_out)``
      map). ``batch_dims`` and a contracted batch axis are refused. A kernel the parameter
      tree cannot read on its own needs the methods' ``kernel_output_axes``
      (:func:`kernel_output_axes`).
    * ``Conv`` (any number of spatial dimensions): ``inputs (N, T, k_1*...*k_d*c_in)``,
      the patches flattened in the kernel's own ``(k_1, ..., k_d, c_in)`` order
      with the layer's strides, padding (``SAME``, ``SAME_LOWER``, ``VALID``,
      explicit, ``CIRCULAR``, ``REFLECT``, ``CAUSAL``), kernel and input
      dilation; ``output_grads`` and ``outputs (N, T, c_out)``. Extra leading
      batch axes are folded into ``T``. For every layer
      ``inputs @ kernel.reshape(-1, c_out) + bias == outputs``.
    * ``outputs`` are pre-activation (bias included). ``output_grads`` are the
      gradients of the per-example loss with respect to them: ``N * dL/ds``
      for ``loss_reduction="mean"``, ``dL/ds`` for ``"sum"``; with
      ``fisher="sampled"``, the gradient of the per-example negative
      log-likelihood of a sampled target.
    * Statistics are at least float32 (bfloat16/float16 models get float32;
      float64 stays float64); ``grads`` are in the parameters' dtypes.

    * ``Embed`` (a lookup ``embedding[ids]``, the dense map ``onehot(ids) @ embedding``):
      ``inputs`` the one-hot rows ``(N, V)`` or ``(N, T, V)`` (formed only when read;
      ``LayerStats.input_square_mean()`` gives the token frequencies from the ids),
      ``output_grads`` and ``outputs (N, D)`` or ``(N, T, D)``. Ids whose leading axis is
      not the batch are refused. A table also used by ``attend`` (a tied output head,
      ``logits = h @ embeddingᵀ``) gets statistics of kind ``"tied_embedding"`` that combine
      both uses: the head's ``T'`` positions join the lookup's with their roles swapped,
      ``inputs (N, T + T', V)`` = the one-hot rows then the per-example logit gradients,
      ``output_grads (N, T + T', D)`` = the lookup's output gradients then the queries ``h``,
      so that ``Σ_t inputs_t ⊗ output_grads_t`` is each example's exact gradient of the table;
      ``outputs`` is ``None``. (An ``attend`` applied twice, nested, or on a query without the
      batch axis leaves the table without statistics, with an INFO line.)
    * ``Einsum`` whose equation is a dense map on contracted axes: as ``DenseGeneral`` (the
      contracted letters into ``d_in`` in the kernel's order, the kernel letters kept in the
      output into ``d_out``, the input letters kept in the output into positions); other
      equations are refused with the equation named.

    * ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm``, ``InstanceNorm`` (their
      scale and bias, ``outputs = x̂ ⊙ scale + bias``): statistics of kind ``"scale_shift"``
      (``LayerStats.layer_kind``), ``inputs`` the normalised input ``x̂ (N, T, F)`` read back
      as ``(outputs − bias) / scale`` (0 where ``|scale| < 1e-6``), ``output_grads`` and
      ``outputs (N, T, F)``, ``F`` the features the parameters span. A norm applied more than
      once, inside a nested transformation, or over feature axes that are not the input's
      trailing axes gets none (an INFO line), and is not refused.

    Parameters of other layers (``ConvLocal``, ``ConvTranspose``, subclasses whose own
    ``__call__`` does not run ``Dense.__call__`` / ``Conv.__call__``, ...) get no
    statistics but do get gradients.

    Refused, with an error naming the layer:

    * a layer applied more than once in one forward pass (shared weights, or
      two models with the same layer paths): the statistics of the separate
      applications would have to be summed or concatenated in a way no
      downstream preconditioner expects, and silently keeping one of them would
      be wrong;
    * a captured layer called inside a nested transformation inside
      ``loss_fn`` (``jax.vmap``, ``jax.checkpoint``, ``lax.scan``, ``nn.scan``,
      ``nn.vmap``, ``nn.remat``, ...);
    * grouped or depthwise convolutions (``feature_group_count > 1``), kernel
      masks, custom ``dot_general`` / ``conv_general_dilated``, unknown padding
      strings, complex dtypes, inputs without a batch axis.

    ``loss_fn`` is traced twice (discovery, then the real pass), so Python side
    effects in it run twice.

    Args:
      loss_fn: ``loss_fn(params, *args)`` returning a scalar loss, or
        ``(loss, aux)`` when ``has_aux``. It calls ``model.apply`` itself.
      params: the parameters to differentiate (a Flax variables dict such as
        ``{"params": ...}``, or the bare ``params`` tree).
      *args: further arguments of ``loss_fn`` (data, targets, RNGs); not
        differentiated.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``. Default ``False``.
      fisher: ``"empirical"`` (default): ``output_grads`` come from the data's
        own loss, at no extra cost. ``"sampled"``: they come from targets drawn
        from the model's predictive distribution; the loss must be computed
        with a helper of :mod:`sofim_optax.curvature.losses` (which registers
        the predictions), and ``rng`` is required. The forward pass is shared;
        the VJP is pulled back along a second cotangent. ``grads`` and
        ``value`` are always those of the real loss.
      rng: PRNG key, required for ``fisher="sampled"`` (ignored otherwise).
        The ``i``-th registered loss helper call samples with
        ``jax.random.fold_in(rng, i)``: ``jax.random.categorical(key, logits)``,
        ``jax.random.bernoulli(key, sigmoid(logits))`` or
        ``predictions + jax.random.normal(key, shape, dtype)``, on the first
        ``fisher_batch_size`` examples. Default ``None``.
      fisher_batch_size: if set (a positive int ``M``), statistics are kept for
        the first ``M`` examples only (leading dimension ``M``); with
        ``fisher="sampled"`` targets are drawn for those ``M`` examples only.
        Default ``None`` (the whole batch).
      loss_reduction: how ``loss_fn`` reduces over the batch, ``"mean"``
        (default) or ``"sum"``; sets the scale of ``output_grads`` in the
        empirical mode (see above).

    Returns:
      ``(value, grads, layer_stats)``: ``value`` is ``loss`` or ``(loss, aux)``
      as for :func:`jax.value_and_grad`; ``grads`` has the structure of
      ``params``; ``layer_stats`` is a ``dict[str, LayerStats]``.
    """
    options = _capture.capture_options(locals())  # handed over unchanged

    run = _runner(loss_fn, args)
    value, grads, stats, _ = _capture.value_grad_and_stats(run, params, **options)
    return value, grads, stats


def kernel_output_axes(
    loss_fn: Callable[..., Any], params: Any, *args: Any, has_aux: bool = False
) -> dict[str, int]:
    """How many output axes each ``DenseGeneral`` kernel that ``loss_fn`` calls has.

    The parameter tree alone cannot always tell a dense map over several axes from a
    convolution (a ``(heads, head_dim, d_model)`` kernel with a ``(d_model,)`` bias reads as
    either). Pass the result as the ``kernel_output_axes`` argument of a layer-wise method
    (``scale_by_kfac``, ``scale_by_mini_block_fisher``, ...) to make every such layer read as
    the dense map it is; Mini-Block Fisher needs it for attention's output projections, and
    every method for a bias-less ``DenseGeneral`` with several feature axes. One shape-only trace
    (:func:`jax.eval_shape`), nothing computed.

    Args:
      loss_fn: as for :func:`value_grad_and_stats`.
      params: the parameters, as for :func:`value_grad_and_stats`.
      *args: further arguments of ``loss_fn``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``. Default ``False``.

    Returns:
      ``{layer path: number of feature axes}`` of every captured ``DenseGeneral`` (including the
      projections inside attention).
    """

    return _capture.kernel_output_axes(_runner(loss_fn, args), params, has_aux=has_aux)
