"""K-BFGS and K-BFGS(L) (Goldfarb, Ren & Bahamou, NeurIPS 2020) as optax transformations.

Each captured layer's block of the inverse Hessian is approximated by a Kronecker product
``H_a ⊗ H_g`` of two small matrices that are maintained by (damped) BFGS updates instead of
being inverted. The algorithm follows the authors' public code (``renyiryry/
kbfgs_neurips2020_public``, ``kbfgs_utils.py`` / ``training_function.py`` /
``training_utils.py``) where it and the third-party ASDL implementation differ
(``docs/methods/kbfgs.md`` lists the differences). Everything the layer-wise methods share
(layer discovery, statistics checks, fallback) lives in :mod:`sofim_optax.layerwise`.

Warm start of ``A`` (the authors average ``mean ā āᵀ`` over one pass of the training set at
the initial weights before training) is :func:`sofim_optax.kbfgs_warm_start.warm_start`
with :func:`sofim_optax.kbfgs_warm_start.batch_input_factors`.
The extra forward/backward pass that K-BFGS needs for its ``(s, y)`` pairs is made by
:func:`sofim_optax.curvature.two_pass.two_pass_value_grad_and_stats` (or the ready train step
:func:`sofim_optax.curvature.two_pass.make_two_pass_train_step`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sofim_optax import aliases, layerwise, linalg
from sofim_optax import hyperparameters as hp
from sofim_optax.hyperparameters import Scalar, ScalarOrSchedule

__all__ = [
    "KbfgsCurvature",
    "layouts",
    "ScaleByKbfgsState",
    "scale_by_kbfgs",
    "kbfgs",
    "kbfgs_l",
]

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
      valid: ``(n_layers, M)`` bool, which ring slots hold a pair (K-BFGS(L); ``M = 0``
        otherwise).
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

    A: dict[str, jax.Array]
    Ha: dict[str, jax.Array]
    a_mean: dict[str, jax.Array]
    Hg: dict[str, jax.Array]
    S: dict[str, jax.Array]
    Y: dict[str, jax.Array]
    valid: jax.Array
    head: jax.Array
    s_ema: dict[str, jax.Array]
    y_ema: dict[str, jax.Array]
    prev_outputs_mean: dict[str, jax.Array]
    prev_grads_mean: dict[str, jax.Array]
    has_prev: jax.Array
    started: jax.Array
    warm: jax.Array
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


class ScaleByKbfgsState(NamedTuple):
    """State of :func:`scale_by_kbfgs`.

    Attributes:
      count: ``()`` int32, number of updates so far.
      curvature: :class:`KbfgsCurvature`.
      fallback_state: :class:`sofim_optax.layerwise.FallbackState`.
    """

    count: jax.Array
    curvature: KbfgsCurvature
    fallback_state: layerwise.FallbackState


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


def _skip_ok(s: jax.Array, y: jax.Array, g_ref: jax.Array, threshold: Any) -> jax.Array:
    """The authors' acceptance rule: ``sᵀy > threshold · sᵀs · ‖g_ref‖`` (and ``sᵀy > 0``), finite."""
    sy, ss = jnp.dot(s, y), jnp.dot(s, s)
    ok = (sy > 0) & (sy > threshold * ss * jnp.linalg.norm(g_ref))
    return ok & jnp.isfinite(sy) & jnp.isfinite(ss)


def _guarded_bfgs(H, s, y, g_ref, threshold):
    """BFGS update of ``H`` with the authors' skip rules; returns ``(H', accepted)``."""
    new = linalg.bfgs_inverse_update(H, s, y)
    new = 0.5 * (new + new.T)  # keep round-off from accumulating asymmetry over many updates
    ok = _skip_ok(s, y, g_ref, threshold) & jnp.all(jnp.isfinite(new))
    return jnp.where(ok, new, H), ok


def _chronological(buf: jax.Array, head: jax.Array) -> jax.Array:
    """Ring buffer rows, oldest first (slot ``head`` holds the oldest once the ring is full)."""
    return jnp.roll(buf, -head, axis=0)


def _kbfgs_method(
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
                _chronological(curv.valid[i], head),
                v,
                jnp.asarray(hg_init).astype(v.dtype),
                lbfgs_method,
            )
        return lg.get(curv.Hg, i, "g") @ v

    def init(param_layout, dtype):
        la, lg = layouts(param_layout.layers)
        n, m = len(param_layout.layers), memory or 0
        rings = {k: jnp.zeros((c, m, lg.dims[k]), dtype) for k, c in lg.sizes.items()}
        return KbfgsCurvature(
            A=la.zeros(dtype),
            Ha=la.eyes(dtype),
            a_mean=la.vectors(dtype),
            Hg={}
            if lbfgs
            else jax.tree.map(lambda e: jnp.asarray(hg_init, dtype) * e, lg.eyes(dtype)),
            S=rings if lbfgs else {},
            Y=dict(rings) if lbfgs else {},
            valid=jnp.zeros((n, m), bool),
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
            new["valid"] = jnp.where(ok, curv.valid[i].at[head].set(True), curv.valid[i])
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
        prev_active: tuple[int, ...] = ()
        if previous_batch_stats is not None:
            prev_active = layerwise.check_layer_stats(param_layout, previous_batch_stats, _NAME)
            _check_outputs(param_layout, previous_batch_stats, "previous_batch_stats")
        dtype = next(iter(curv.A.values())).dtype if curv.A else jnp.float32
        sqrt_l = sqrt_damping(dtype)
        out_side: dict[str, dict] = {}  # field -> {(layer, "g"): value}
        in_side: dict[str, dict] = {}  # field -> {(layer, "a"): value}
        valid, head, hg_updates = curv.valid, curv.head, curv.hg_updates
        # 1) H_g from the previous minibatch, re-evaluated at the current parameters.
        for i in prev_active:
            new, ok = update_hg(curv, lg, i, layers[i], previous_batch_stats[layers[i].path], dtype)
            if lbfgs:
                valid = valid.at[i].set(new.pop("valid"))
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
            valid=valid,
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
    return layerwise.LayerwiseMethod(init, update_statistics, None, precondition)


@hp.structural("memory")
def scale_by_kbfgs(
    *,
    damping: Scalar = 0.3,
    mu1: Scalar = 0.2,
    ema: Scalar = 0.9,
    memory: int | None = None,
    mu2: Scalar | None = None,
    pair_ema: Scalar = 0.9,
    hg_init: Scalar = 1.0,
    skip_threshold: Scalar = 1e-4,
    lbfgs_method: str = "compact",
    fallback: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition each captured layer's gradient by K-BFGS's ``H_a ⊗ H_g`` (K-BFGS(L) with ``memory``).

    For a dense layer ``s = Wᵀā`` the Hessian of one example's loss with respect to the
    layer is exactly ``(ā āᵀ) ⊗ ∇²_s ℓ``; K-BFGS (Goldfarb, Ren & Bahamou 2020) approximates
    the layer's block of the inverse Hessian by ``H_a ⊗ H_g`` with ``H_a ≈ (A + √λ I)⁻¹``,
    ``A = E[ā āᵀ]``, and ``H_g ≈ E[∇²_s ℓ]⁻¹``, both kept by BFGS updates (no inversion
    after the first step). The returned update for the layer's gradient matrix ``V``
    (``d_a × d_g``: kernel rows then the bias row) is (no learning rate, no sign)

    .. math:: \Delta = H_a\, V\, H_g .

    One update, for a captured layer, on minibatch ``B_t`` at parameters ``θ_t``:

    1. **H_g** (skipped at the first step, or when ``previous_batch_stats`` is ``None``): the
       pair of the *previous* minibatch ``B_{t-1}`` between its own parameters ``θ_{t-1}`` and
       the current ``θ_t``,

       .. math:: s = \bar s_{B_{t-1}}(\theta_{t-1}) - \bar s_{B_{t-1}}(\theta_t),\qquad
                 y = \bar g_{B_{t-1}}(\theta_{t-1}) - \bar g_{B_{t-1}}(\theta_t)

       (``s̄`` the mean pre-activation ``LayerStats.outputs``, ``ḡ`` the mean per-example
       pre-activation gradient ``LayerStats.output_grads``; the values at ``θ_{t-1}`` were
       stored at step ``t-1``, those at ``θ_t`` come from ``previous_batch_stats``). The pair
       is averaged, ``s̄_p ← β_p s̄_p + (1-β_p) s``, ``ȳ_p`` alike (``pair_ema``, zero
       initialised; BFGS, the damping and the skip rule are invariant to a common scale of
       the pair, so the zero start needs no bias correction), then **double damped**
       (:func:`sofim_optax.linalg.double_damping` with ``H_g y``, ``μ₁`` and ``μ₂``), then

       * K-BFGS: ``H_g ← BFGS(H_g, s, y)`` (:func:`sofim_optax.linalg.bfgs_inverse_update`),
         **skipped** when ``sᵀy ≤ 0``, when ``sᵀy ≤ skip_threshold·sᵀs·‖ḡ‖`` (``ḡ`` the
         previous minibatch's mean gradient at ``θ_{t-1}``) or when anything is non-finite;
       * K-BFGS(L): the pair is appended to a ring buffer of ``memory`` pairs (dropping the
         oldest) under the same acceptance rule; ``H_g v`` is the L-BFGS product with
         ``H₀ = hg_init·I`` (:func:`sofim_optax.linalg.lbfgs_inverse_matvec`, rows handed over
         oldest first). Powell damping uses that L-BFGS ``H_g y``.

       This is the authors' second forward/backward pass on the same minibatch at ``θ+``, moved
       to the start of the next update so that the update keeps optax's form: the caller
       evaluates the previous minibatch at the current parameters (same cost, same pair, same
       order of operations as the authors' iteration). See
       :func:`sofim_optax.curvature.two_pass.make_two_pass_train_step`.
    2. **A**: ``A ← β A + (1-β) mean ā āᵀ`` (``β = ema``, constant as in the authors' code).
       On the layer's first step ``A`` is *not* updated when it was warm-started
       (:func:`sofim_optax.kbfgs_warm_start.warm_start`, the authors' one pass over the
       training set); without a warm start the first minibatch's ``mean ā āᵀ`` is taken as it is.
    3. **First step**: ``H_a = (A + √λ I)⁻¹`` exactly (through the eigendecomposition, finite
       for any finite ``A``); ``H_g = hg_init·I`` (empty memory for K-BFGS(L)).
    4. **Direction** ``Δ = H_a V H_g``.
    5. **H_a** (Hessian-action BFGS, after the direction): with ``ā_mean = mean ā`` (the bias
       coordinate exactly 1, the authors' "V2" fix), ``s_a = H_a ā_mean``,
       ``y_a = (A + √λ I) s_a``, ``H_a ← BFGS(H_a, s_a, y_a)`` under the same skip rules with
       ``‖ā_mean‖`` as reference (``s_aᵀy_a > 0`` always holds for ``λ > 0``).

    Convolutions (statistics ``(N, T, ·)``) are accepted as an extension beyond the paper:
    ``A`` and ``ā_mean`` average over examples and positions, ``s̄`` too, and ``ḡ`` sums over
    positions (the KFC scaling).

    The gradient the authors precondition is an EMA of the L2-regularised gradient:
    :func:`kbfgs` chains that in. Statistics and matrices are kept in float32 (float64 for
    float64 kernels); updates come back in each leaf's dtype; a non-finite pair or update is
    skipped, so the state never turns NaN from non-finite statistics.

    Args:
      damping: ``λ`` (default ``0.3``, the authors' MNIST-autoencoder demo value). ``A`` is
        damped by ``√λ`` (on the scale of ``A = E[āāᵀ]``), and ``μ₂ = √λ`` (unless given)
        floors ``sᵀy/sᵀs`` of every pair that updates ``H_g``. A change through
        ``optax.inject_hyperparams`` acts on the next ``H_a`` Hessian-action update and the
        next damping (``H_a`` is inverted exactly only at the first step).
      mu1: ``μ₁`` of the Powell damping on ``H_g`` (default ``0.2``).
      ema: ``β``, decay of the EMA of ``A`` (default ``0.9``).
      memory: ``None`` (default) for K-BFGS (dense ``H_g``), or the number of L-BFGS pairs per
        layer for K-BFGS(L) (the authors use ``100``).
      mu2: ``μ₂`` of the second damping step (default ``None``: ``√λ``, as the authors).
      pair_ema: decay of the EMA of the ``(s, y)`` pairs (default ``0.9``; the authors use
        ``0`` only for full-batch training).
      hg_init: ``H_g``'s initial scale (default ``1.0``: ``H_g = I``; also the L-BFGS ``γ``,
        fixed as in the authors' code rather than the usual ``sᵀy/yᵀy``).
      skip_threshold: the ``1e-4`` of the skip rule ``sᵀy ≤ 1e-4·sᵀs·‖g_ref‖``.
      lbfgs_method: ``"compact"`` (default, as the authors) or ``"two_loop"``.
      fallback: transformation for the parameters no captured layer covers (``None``:
        identity); see :func:`sofim_optax.scale_by_kfac`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params=None,
      *, layer_stats, previous_batch_stats=None)`` requires ``layer_stats`` (this minibatch at
      the current parameters, with ``outputs``) and takes ``previous_batch_stats`` (the
      previous minibatch at the current parameters; the same layer keys). Errors (missing
      statistics, unknown keys, shapes, missing ``outputs``) are raised at trace time and name
      the layer.

    References:
      Goldfarb, Ren & Bahamou, `Practical Quasi-Newton Methods for Training Deep Neural
      Networks <https://arxiv.org/abs/2006.08877>`_, NeurIPS 2020; code
      ``github.com/renyiryry/kbfgs_neurips2020_public``.
    """
    if memory is not None:
        hp.check_positive_int(_NAME, "memory", memory, static=True)
    hp.check_decay(_NAME, "ema", ema)
    hp.check_decay(_NAME, "pair_ema", pair_ema)
    hp.check_damping(_NAME, damping)
    if isinstance(mu1, (int, float)) and not 0.0 < mu1 < 1.0:
        raise ValueError(f"{_NAME}: mu1 must be in (0, 1), got {mu1!r}")
    hp.check_choice(_NAME, "lbfgs_method", lbfgs_method, ("compact", "two_loop"))
    # K-BFGS's pairs compare consecutive minibatches, so every statistic is used every step.
    return layerwise.layerwise_transformation(
        name=_NAME,
        method=_kbfgs_method(
            damping, mu1, mu2, ema, pair_ema, memory, hg_init, skip_threshold, lbfgs_method
        ),
        state_cls=ScaleByKbfgsState,
        stats_period=1,
        inverse_period=1,
        fallback=fallback,
    )


def _gradient_ema_chain(
    scale: optax.GradientTransformationExtraArgs,
    *,
    learning_rate: ScalarOrSchedule,
    gradient_ema: Scalar | None,
    weight_decay: Scalar,
    weight_decay_mask: Any,
) -> optax.GradientTransformationExtraArgs:
    """The authors' loop: coupled L2, an EMA of the gradient, ``scale``, the learning rate."""
    parts = [optax.add_decayed_weights(weight_decay, weight_decay_mask)]
    if gradient_ema is not None:
        parts.append(optax.ema(gradient_ema, debias=False))
    parts += [scale, optax.scale_by_learning_rate(learning_rate)]
    return optax.chain(*parts)


_KBFGS_ALIAS_ARGUMENTS = {"gradient_ema": 0.9, "weight_decay": 0.0, "weight_decay_mask": None}

_KBFGS_DOC = r"""K-BFGS as in the authors' training loop: L2, gradient EMA, ``H_a m H_g``, fixed step.

    .. math::

        g_t &= \nabla L(\theta_t) + \tau\,\theta_t \\
        m_t &= \mu\, m_{t-1} + (1-\mu)\, g_t \quad (m_0 = 0\text{, no bias correction})\\
        \theta_{t+1} &= \theta_t - \eta_t\, H_a\, m_t\, H_g \quad\text{(per layer)}

    i.e. ``optax.chain(add_decayed_weights(weight_decay), ema(gradient_ema, debias=False),
    scale_by_kbfgs(...), scale_by_learning_rate(learning_rate))``. The weight decay ``τ`` is
    *coupled* (added to the gradient before preconditioning, the authors' ``τ = 1e-5`` on all
    weights and biases); the gradient average is the EMA form (``0.9`` in the paper's code),
    before the preconditioner, hence its name ``gradient_ema`` (``momentum`` in KFAC and the
    KPSVD family is heavy-ball momentum on the preconditioned direction).

    Args:
      learning_rate: ``η`` (the authors' MNIST demo: ``0.3`` with ``damping=0.3``; on the
        Fashion-MNIST autoencoder with Flax's default initialisation ``0.3`` diverged and
        ``0.1`` trained).
      gradient_ema: ``μ``, EMA decay of the gradient before preconditioning (default ``0.9``);
        ``None`` for none.
      weight_decay: ``τ`` (default ``0.0``; ``1e-5`` in the paper).
      weight_decay_mask: optional mask for ``add_decayed_weights`` (default ``None``: all).
      damping, mu1, ema, memory, mu2, pair_ema, hg_init, skip_threshold, lbfgs_method,
        fallback: keyword-only, see :func:`scale_by_kbfgs` (same defaults).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; call ``update(grads, state, params,
      layer_stats=..., previous_batch_stats=...)``.

    Examples:
      A linen train step doing both passes (see
      :func:`sofim_optax.curvature.two_pass.make_two_pass_train_step`)::

        opt = sofim_optax.kbfgs(0.3, damping=0.3, weight_decay=1e-5)
        step = jax.jit(make_two_pass_train_step(loss_fn, opt))
        opt_state, previous = opt.init(params), None
        for batch in batches:            # batch = (x, y), the arguments of loss_fn after params
            params, opt_state, loss = step(params, opt_state, batch, previous)
            previous = batch

    References:
      Goldfarb, Ren & Bahamou, `Practical Quasi-Newton Methods for Training Deep Neural
      Networks <https://arxiv.org/abs/2006.08877>`_, NeurIPS 2020.
    """

kbfgs = aliases.make_alias(
    scale_by_kbfgs,
    _gradient_ema_chain,
    name="kbfgs",
    doc=_KBFGS_DOC,
    alias_arguments=_KBFGS_ALIAS_ARGUMENTS,
)


_KBFGS_L_DOC = r"""K-BFGS(L): :func:`kbfgs` with ``H_g`` an L-BFGS operator of ``memory`` pairs.

    ``H_a`` stays the dense Hessian-action BFGS matrix, as in the authors' code.

    Args:
      memory: L-BFGS pairs per layer (default ``100``, the authors'). It fixes the shapes of
        the state: under ``optax.inject_hyperparams`` list it in ``static_args``.
      every other argument: as :func:`kbfgs`, keyword-only, same defaults.
    """

kbfgs_l = aliases.make_alias(
    scale_by_kbfgs,
    _gradient_ema_chain,
    name="kbfgs_l",
    doc=_KBFGS_L_DOC,
    alias_arguments=_KBFGS_ALIAS_ARGUMENTS,
    overrides={"memory": 100},
)
