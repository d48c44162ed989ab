"""K-BFGS's curvature: the stacked state and the method on the layer-wise skeleton.

The public transformations are in :mod:`sofim_optax.kbfgs`; this module holds the state
(:class:`KbfgsCurvature`), where each layer lives in it (:func:`layouts`), and the four
functions of the method (:func:`make_method`): the ``(s, y)`` pairs and the ``H_g`` update,
the EMA of ``A`` with the exact ``H_a`` on a layer's first step, and the direction
``H_a V H_g`` followed by the Hessian-action update of ``H_a``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from sofim_optax import guards, layerwise, linalg

__all__ = ["KbfgsCurvature", "layouts", "make_method"]

_NAME = "scale_by_kbfgs"


class KbfgsCurvature(NamedTuple):
    """K-BFGS's curvature state: arrays stacked by size, like KFAC's factors.

    Every candidate layer (a node with a ``kernel`` of ``ndim >= 2``) gets an entry, whether it
    is captured or not; ``d_a = d_in (+1 for the bias)``, ``d_g = d_out``, ``M = memory``.
    Input-side arrays of all layers with the same ``d_a`` share one stack under the key
    ``"d{d_a}"``, output-side arrays of all layers with the same ``d_g`` one under
    ``"d{d_g}"``, layers in path order (:func:`layouts` gives the two
    :class:`sofim_optax.layerwise.FactorLayout` that say where each layer's entry is; a model
    whose layers all differ in size has one entry per stack). Per-layer flags are vectors over
    the layers in path order.

    Attributes:
      A: ``{"d{d_a}": (n, d_a, d_a)}``, the EMA of ``mean ā āᵀ`` (undamped).
      Ha: like ``A``: ``H_a ≈ (A + √λ I)⁻¹``, kept by Hessian-action BFGS.
      a_mean: ``{"d{d_a}": (n, d_a)}``, ``mean ā`` of the current minibatch (last coordinate 1
        for the bias), for the Hessian-action update of ``H_a``.
      Hg: ``{"d{d_g}": (n, d_g, d_g)}``, the damped-BFGS ``H_g`` (K-BFGS); ``{}`` for K-BFGS(L).
      S, Y: ``{"d{d_g}": (n, M, d_g)}``, the L-BFGS ring buffers (K-BFGS(L)); ``{}`` for K-BFGS.
      valid: ``{"d{d_g}": (n, M)}`` bool, which ring slots hold a pair (K-BFGS(L)); ``{}`` for
        K-BFGS, like ``S`` and ``Y`` (so that the state holds no zero-size array, which
        ``orbax.checkpoint`` refuses to save).
      head: ``(n_layers,)`` int32, the ring slot the next pair goes to (= the oldest pair once
        the ring is full).
      s_ema, y_ema: ``{"d{d_g}": (n, d_g)}``, the EMA of the pairs (before damping).
      prev_outputs_mean, prev_grads_mean: ``{"d{d_g}": (n, d_g)}``, ``s̄`` and ``ḡ`` (mean
        pre-activation and mean per-example pre-activation gradient) of the last minibatch at
        the parameters it was drawn at.
      has_prev: ``(n_layers,)`` bool, ``prev_*`` hold the previous step's means.
      started: ``(n_layers,)`` bool, the layer's first step (exact ``H_a``) is done.
      warm: ``(n_layers,)`` bool, ``A`` was warm-started
        (:func:`sofim_optax.kbfgs_warm_start.warm_start`), so the first step does not update it.
      hg_updates, ha_updates: ``(n_layers,)`` int32, accepted updates of ``H_g`` (pairs appended
        for K-BFGS(L)) and of ``H_a`` so far (diagnostics; skipped updates are not counted).
    """

    # The input side, then what says how it was started.
    A: dict[str, jax.Array]
    Ha: dict[str, jax.Array]
    a_mean: dict[str, jax.Array]
    started: jax.Array
    warm: jax.Array
    # The output side: H_g (or its L-BFGS ring) and the pairs that update it.
    Hg: dict[str, jax.Array]
    S: dict[str, jax.Array]
    Y: dict[str, jax.Array]
    valid: dict[str, jax.Array]
    head: jax.Array
    s_ema: dict[str, jax.Array]
    y_ema: dict[str, jax.Array]
    has_prev: jax.Array
    prev_outputs_mean: dict[str, jax.Array]
    prev_grads_mean: dict[str, jax.Array]
    # Diagnostics.
    hg_updates: jax.Array
    ha_updates: jax.Array


def layouts(
    layers: tuple[layerwise.Layer, ...],
) -> tuple[layerwise.FactorLayout, layerwise.FactorLayout]:
    """``(input side, output side)``: where each layer's entry lives in the stacks of
    :class:`KbfgsCurvature` (role ``"a"`` by ``d_a``, role ``"g"`` by ``d_g``)."""
    return (
        layerwise.FactorLayout.build(layers, ("a",), lambda layer, role: layer.d_a),
        layerwise.FactorLayout.build(layers, ("g",), lambda layer, role: layer.d_g),
    )


# ----------------------------------------------------------------------------------------
# Per-layer pieces.
# ----------------------------------------------------------------------------------------


def _means(layer: layerwise.Layer, stats: Any, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``(s̄, ḡ)``: mean pre-activation and mean per-example pre-activation gradient.

    Dense ``(N, d_out)``: plain means over examples. Convolutions ``(N, T, c_out)``: ``s̄`` is
    the mean over examples and positions, ``ḡ`` the sum over positions averaged over
    examples (``T ×`` the mean), matching the KFC scaling of ``A`` and ``G`` (an extension:
    the paper treats fully-connected layers only).
    """
    out = jnp.asarray(stats.outputs).astype(dtype)
    g = jnp.asarray(stats.output_grads).astype(dtype)
    t = 1 if g.ndim == 2 else g.shape[1]
    return (
        jnp.mean(out.reshape(-1, layer.d_out), axis=0),
        t * jnp.mean(g.reshape(-1, layer.d_out), axis=0),
    )


def _input_mean(layer: layerwise.Layer, inputs: jax.Array, dtype: Any) -> jax.Array:
    x = layerwise.homogeneous_inputs(inputs, layer.has_bias, dtype)
    return jnp.mean(x.reshape(-1, layer.d_a), axis=0)


def _check_outputs(layout: layerwise.ParamLayout, stats: Mapping[str, Any], what: str) -> None:
    for key, st in stats.items():
        layer = layout.layers[layout.index(key)]
        outputs = getattr(st, "outputs", None)
        if outputs is None:
            raise ValueError(
                f"{_NAME}: layer {key!r} (kernel {layer.kernel_shape}): {what} have no `outputs`. "
                "K-BFGS needs the pre-activation outputs (LayerStats.outputs) for its (s, y) pairs; "
                "the capture adapters curvature.linen/nnx.value_grad_and_stats provide them."
            )
        if tuple(outputs.shape) != tuple(st.output_grads.shape):
            raise ValueError(
                f"{_NAME}: layer {key!r} (kernel {layer.kernel_shape}): {what}: outputs "
                f"{tuple(outputs.shape)} and output_grads {tuple(st.output_grads.shape)} must "
                "have the same shape."
            )


def _missing_previous_message(layout: layerwise.ParamLayout) -> str:
    return (
        f"{_NAME}.update (kbfgs, kbfgs_l) needs the keyword argument `previous_batch_stats` on "
        "every call: the statistics (a dict {layer path: LayerStats} with `outputs`, the same "
        "keys as `layer_stats`) of the PREVIOUS minibatch evaluated at the CURRENT parameters, "
        "from which K-BFGS builds the (s, y) pairs that update H_g; without them H_g would "
        "never change. Compute both statistics with `value, grads, layer_stats, "
        "previous_batch_stats = sofim_optax.curvature.two_pass.two_pass_value_grad_and_stats("
        "loss_fn, params, batch, previous_batch)`, or use the train step "
        "`sofim_optax.curvature.two_pass.make_two_pass_train_step(loss_fn, tx)`. At the first "
        "step there is no previous minibatch: pass the current one's, "
        "`previous_batch_stats=layer_stats` (ignored at that step; two_pass does this when "
        f"previous_batch is None). Layers found in params: {list(layout.layer_paths)}."
    )


def _check_previous(
    layout: layerwise.ParamLayout, stats: Mapping[int, Any], previous: Any
) -> tuple[int, ...]:
    """Validates ``previous_batch_stats`` like ``layer_stats`` and returns its layer indices.

    It is required, it passes the same checks as ``layer_stats`` (keys, shapes, ``outputs``),
    and it covers exactly the layers of ``layer_stats``.
    """
    if previous is None:
        raise ValueError(_missing_previous_message(layout))
    active = layerwise.check_layer_stats(layout, previous, _NAME, "previous_batch_stats")
    paths = layout.layer_paths
    _check_outputs(layout, {paths[i]: previous[paths[i]] for i in active}, "previous_batch_stats")
    if set(active) != set(stats):
        missing = sorted(paths[i] for i in set(stats) - set(active))
        extra = sorted(paths[i] for i in set(active) - set(stats))
        raise ValueError(
            f"{_NAME}: previous_batch_stats must hold the same layers as layer_stats; "
            f"missing from previous_batch_stats: {missing}, not in layer_stats: {extra}. "
            "Capture both with the same loss_fn (sofim_optax.curvature.two_pass"
            ".two_pass_value_grad_and_stats does)."
        )
    return active


def _skip_ok(s: jax.Array, y: jax.Array, g_ref: jax.Array, threshold: Any) -> jax.Array:
    """The authors' acceptance rule: ``sᵀy > threshold · sᵀs · ‖g_ref‖`` (and ``sᵀy > 0``), finite."""
    sy, ss = jnp.dot(s, y), jnp.dot(s, s)
    ok = (sy > 0) & (sy > threshold * ss * jnp.linalg.norm(g_ref))
    return ok & jnp.isfinite(sy) & jnp.isfinite(ss)


def _guarded_bfgs(H, s, y, g_ref, threshold):
    """BFGS update of ``H`` with the authors' skip rules; returns ``(H', accepted)``."""
    new = linalg.bfgs_inverse_update(H, s, y)
    new = 0.5 * (new + new.T)  # keep round-off from accumulating asymmetry over many updates
    ok = _skip_ok(s, y, g_ref, threshold) & guards.all_finite(new)  # (the fast test of a big H)
    return jnp.where(ok, new, H), ok


def _chronological(buf: jax.Array, head: jax.Array) -> jax.Array:
    """Ring buffer rows, oldest first (slot ``head`` holds the oldest once the ring is full)."""
    return jnp.roll(buf, -head, axis=0)


def make_method(
    damping: Any,
    mu1: Any,
    mu2: Any,
    ema: Any,
    pair_ema: Any,
    memory: int | None,
    hg_init: Any,
    skip_threshold: Any,
    lbfgs_method: str,
) -> layerwise.LayerwiseMethod:
    lbfgs = memory is not None

    def sqrt_damping(dtype):
        return jnp.sqrt(jnp.maximum(jnp.asarray(damping).astype(dtype), linalg.DAMPING_FLOOR))

    def mu2_value(dtype):
        return sqrt_damping(dtype) if mu2 is None else jnp.asarray(mu2).astype(dtype)

    def hg_matvec(curv, lg, i, v):
        """``H_g v`` for layer ``i``: the dense matrix, or the L-BFGS product of its ring."""
        if lbfgs:
            head = curv.head[i]
            return linalg.lbfgs_inverse_matvec(
                _chronological(lg.get(curv.S, i, "g"), head),
                _chronological(lg.get(curv.Y, i, "g"), head),
                _chronological(lg.get(curv.valid, i, "g"), head),
                v,
                jnp.asarray(hg_init).astype(v.dtype),
                lbfgs_method,
            )
        return lg.get(curv.Hg, i, "g") @ v

    def init(param_layout, dtype):
        la, lg = layouts(param_layout.layers)
        n, m = len(param_layout.layers), memory or 0

        def rings():  # (distinct arrays for S and Y, so that a jitted step may donate them)
            return {k: jnp.zeros((c, m, lg.dims[k]), dtype) for k, c in lg.sizes.items()}

        flags = {k: jnp.zeros((c, m), bool) for k, c in lg.sizes.items()}
        return KbfgsCurvature(
            A=la.zeros(dtype),
            Ha=la.eyes(dtype),
            a_mean=la.vectors(dtype),
            Hg={}
            if lbfgs
            else jax.tree.map(lambda e: jnp.asarray(hg_init, dtype) * e, lg.eyes(dtype)),
            S=rings() if lbfgs else {},
            Y=rings() if lbfgs else {},
            valid=flags if lbfgs else {},
            head=jnp.zeros((n,), jnp.int32),
            s_ema=lg.vectors(dtype),
            y_ema=lg.vectors(dtype),
            prev_outputs_mean=lg.vectors(dtype),
            prev_grads_mean=lg.vectors(dtype),
            has_prev=jnp.zeros((n,), bool),
            started=jnp.zeros((n,), bool),
            warm=jnp.zeros((n,), bool),
            hg_updates=jnp.zeros((n,), jnp.int32),
            ha_updates=jnp.zeros((n,), jnp.int32),
        )

    def update_hg(curv, lg, i, layer, prev_stats, dtype):
        """The (s, y) pair of the previous minibatch and the H_g update (K-BFGS or K-BFGS(L)).

        Returns ``({field: new value of layer i}, accepted)``."""
        get = lambda field: lg.get(field, i, "g")
        out_new, g_new = _means(layer, prev_stats, dtype)
        s_new = get(curv.prev_outputs_mean) - out_new
        y_new = get(curv.prev_grads_mean) - g_new
        g_ref = get(curv.prev_grads_mean)
        usable = curv.has_prev[i] & jnp.all(jnp.isfinite(s_new)) & jnp.all(jnp.isfinite(y_new))
        s_ema = jnp.where(
            usable, pair_ema * get(curv.s_ema) + (1 - pair_ema) * s_new, get(curv.s_ema)
        )
        y_ema = jnp.where(
            usable, pair_ema * get(curv.y_ema) + (1 - pair_ema) * y_new, get(curv.y_ema)
        )
        s, y = linalg.double_damping(
            s_ema, y_ema, hg_matvec(curv, lg, i, y_ema), mu1, mu2_value(dtype)
        )
        new = {"s_ema": s_ema, "y_ema": y_ema}
        if lbfgs:
            ok = usable & _skip_ok(s, y, g_ref, skip_threshold)
            ok &= jnp.all(jnp.isfinite(s)) & jnp.all(jnp.isfinite(y))
            head = curv.head[i]
            new["S"] = jnp.where(ok, get(curv.S).at[head].set(s), get(curv.S))
            new["Y"] = jnp.where(ok, get(curv.Y).at[head].set(y), get(curv.Y))
            new["valid"] = jnp.where(ok, get(curv.valid).at[head].set(True), get(curv.valid))
            new["head"] = jnp.where(ok, (head + 1) % memory, head)
            return new, ok
        Hg, ok = _guarded_bfgs(get(curv.Hg), s, y, g_ref, skip_threshold)
        new["Hg"] = jnp.where(usable, Hg, get(curv.Hg))
        return new, ok & usable

    def update_statistics(
        curv: KbfgsCurvature, param_layout, stats, previous_batch_stats=None, **extra
    ):
        del extra
        layers = param_layout.layers
        la, lg = layouts(layers)
        _check_outputs(param_layout, {layers[i].path: st for i, st in stats.items()}, "layer_stats")
        prev_active = _check_previous(param_layout, stats, previous_batch_stats)
        dtype = next(iter(curv.A.values())).dtype if curv.A else jnp.float32
        sqrt_l = sqrt_damping(dtype)
        out_side: dict[str, dict] = {}  # field -> {(layer, "g"): value}
        in_side: dict[str, dict] = {}  # field -> {(layer, "a"): value}
        head, hg_updates = curv.head, curv.hg_updates
        # 1) H_g from the previous minibatch, re-evaluated at the current parameters.
        for i in prev_active:
            new, ok = update_hg(curv, lg, i, layers[i], previous_batch_stats[layers[i].path], dtype)
            if lbfgs:
                head = head.at[i].set(new.pop("head"))
            for field, value in new.items():
                out_side.setdefault(field, {})[(i, "g")] = value
            hg_updates = hg_updates.at[i].add(ok.astype(jnp.int32))
        # 2) This minibatch: remember its means, update A, exact H_a on the first step.
        for i, st in stats.items():
            layer = layers[i]
            out_mean, grad_mean = _means(layer, st, dtype)
            out_side.setdefault("prev_outputs_mean", {})[(i, "g")] = out_mean
            out_side.setdefault("prev_grads_mean", {})[(i, "g")] = grad_mean
            in_side.setdefault("a_mean", {})[(i, "a")] = _input_mean(layer, st.inputs, dtype)
            old_a = la.get(curv.A, i, "a")
            first = ~curv.started[i]
            decay = jnp.where(first, 0.0, jnp.asarray(ema).astype(dtype))
            a_hat = layerwise.input_factor(st.inputs, layer.has_bias, dtype)
            a_new = jnp.where(first & curv.warm[i], old_a, decay * old_a + (1 - decay) * a_hat)
            in_side.setdefault("A", {})[(i, "a")] = a_new

            def exact(a):  # eigendecomposition: finite for any finite A, one LAPACK call
                return linalg.damped_inverse(a, sqrt_l, "eigh").astype(a.dtype)

            old_ha = la.get(curv.Ha, i, "a")
            in_side.setdefault("Ha", {})[(i, "a")] = lax.cond(
                first, exact, lambda a, old=old_ha: old, a_new
            )
        active = jnp.asarray(sorted(stats), jnp.int32)
        mask = jnp.zeros_like(curv.has_prev).at[active].set(True)
        stacks = {f: lg.set(getattr(curv, f), v) for f, v in out_side.items()}
        stacks.update({f: la.set(getattr(curv, f), v) for f, v in in_side.items()})
        return curv._replace(
            **stacks,
            head=head,
            has_prev=mask,
            started=curv.started | mask,
            hg_updates=hg_updates,
        )

    def precondition(curv: KbfgsCurvature, param_layout, grads, **extra):
        """``Δ = H_a V H_g``, then the Hessian-action BFGS update of ``H_a`` (which the
        authors make after the direction, so it belongs to this step)."""
        del extra
        la, lg = layouts(param_layout.layers)
        out, new_ha = {}, {}
        ha_updates = curv.ha_updates
        for i, v in grads.items():
            ha, a_mean = la.get(curv.Ha, i, "a"), la.get(curv.a_mean, i, "a")
            left = ha @ v  # (d_a, d_g)
            if lbfgs:
                out[i] = hg_matvec(curv, lg, i, left.T).T
            else:
                out[i] = left @ lg.get(curv.Hg, i, "g")
            # Hessian-action BFGS on H_a towards (A + √λ I)⁻¹, after the direction.
            s_a = ha @ a_mean
            y_a = la.get(curv.A, i, "a") @ s_a + sqrt_damping(v.dtype) * s_a
            new_ha[(i, "a")], ok = _guarded_bfgs(ha, s_a, y_a, a_mean, skip_threshold)
            ha_updates = ha_updates.at[i].add(ok.astype(jnp.int32))
        return out, curv._replace(Ha=la.set(curv.Ha, new_ha), ha_updates=ha_updates)

    # Nothing is decomposed on a period: H_a and H_g are kept by BFGS updates every step.
    return layerwise.LayerwiseMethod(
        init,
        update_statistics,
        None,
        precondition,
        after_discarded_statistics=forget_previous,
        extra_statistics=("previous_batch_stats",),
        # (a tied table's head has no pre-activations for the (s, y) pairs: its fallback)
        fallback_kinds=("tied_embedding",),
    )


def forget_previous(curv: KbfgsCurvature) -> KbfgsCurvature:
    """``curv`` with ``has_prev`` off: after a skipped step or a discarded statistics update
    the stored means are not those of the minibatch the next ``previous_batch_stats`` will
    describe, so the next update forms no (s, y) pair and stores fresh means."""
    return curv._replace(has_prev=jnp.zeros_like(curv.has_prev))
