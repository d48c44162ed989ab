"""Mini-Block Fisher (MBF; Bahamou, Goldfarb & Ren, AISTATS 2023) as optax transformations.

MBF preconditions each layer's gradient by a block-diagonal approximation of the layer's
**empirical Fisher** (EF) in which every block is *small*: one ``k×k`` block per
(input channel, output channel) pair of a convolution, and one block per output unit (its
incoming weights and its bias, optionally cut into chunks) of a dense layer. The many small
blocks are estimated from per-example gradients that are never materialised for the whole
batch, stacked by block size, inverted in one batched call per size and applied as batched
matrix-vector products. Counting, the ``lax.cond`` refreshes, dtypes, statistics checks and
fallback routing come from :mod:`sofim_optax.layerwise` (this module supplies a
:class:`~sofim_optax.layerwise.LayerwiseMethod`).

The partition into blocks and the per-batch blocks are in :mod:`sofim_optax.mini_blocks`,
the diagonal fallback in :mod:`sofim_optax.diagonal_fisher`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sofim_optax import aliases, distributed, guards, layerwise, linalg
from sofim_optax import hyperparameters as hp
from sofim_optax.diagonal_fisher import resolve_fallback
from sofim_optax.hyperparameters import Scalar, ScalarOrSchedule
from sofim_optax.mini_blocks import DEFAULT_DENSE_BLOCK_SIZE, BlockLayout, batch_blocks, unpack

__all__ = [
    "MiniBlockFisherCurvature",
    "ScaleByMiniBlockFisherState",
    "GradientMomentumState",
    "scale_by_mini_block_fisher",
    "mini_block_fisher",
    "mbf",
]

_INVERSES = ("cholesky", "eigh", "inv")

# --------------------------------------------------------------------------------------
# State.
# --------------------------------------------------------------------------------------


class MiniBlockFisherCurvature(NamedTuple):
    """MBF's curvature state; every field is an array or a dict of arrays.

    Blocks are stacked **per block size** (:class:`BlockLayout`): all ``s × s`` blocks of all
    layers live in one ``(n_s, s, s)`` array under the key ``"b{s}"`` (e.g. ``"b9"`` for the
    3×3 kernels of every convolution, ``"b1"`` for conv biases, ``"b63"`` for dense chunks).
    Which of ``eigvals``/``eigvecs`` and ``inverses`` is filled depends on ``inverse``; the
    other is ``{}``.

    Attributes:
      stat_updates: ``(n_layers,)`` int32, statistics updates received per layer.
      blocks: ``{"b{s}": (n_s, s(s+1)/2)}``, the EMA empirical-Fisher blocks (undamped),
        packed: the upper triangle of each symmetric block, row by row
        (:func:`sofim_optax.mini_blocks.pack`; half the memory and half the traffic of the
        statistics update), in the accumulation dtype (float32, or float64 for float64
        kernels).
      eigvals: ``inverse="eigh"`` only (else ``{}``): ``{"b{s}": (n_s, s)}``, eigenvalues
        ``w`` of the undamped blocks at the last refresh, clamped at 0 (a padded coordinate
        of a dense chunk has eigenvalue 1, see :func:`scale_by_mini_block_fisher`).
      eigvecs: ``inverse="eigh"`` only (else ``{}``): ``{"b{s}": (n_s, s, s)}``, their
        eigenvectors ``Q`` (columns), so that ``F_b = Q diag(w) Qᵀ``; the damping is applied
        at every step, ``(F_b + λI)⁻¹ u = Q diag(1/(w + λ)) Qᵀ u``.
      inverses: ``inverse="cholesky"``/``"inv"`` only (else ``{}``): ``{"b{s}": (n_s, s,
        s)}``, the damped inverses ``(F_b + λI)⁻¹`` with the ``λ`` of the last refresh.
    """

    stat_updates: jax.Array
    blocks: dict[str, jax.Array]
    eigvals: dict[str, jax.Array]
    eigvecs: dict[str, jax.Array]
    inverses: dict[str, jax.Array]


class ScaleByMiniBlockFisherState(NamedTuple):
    """State of :func:`scale_by_mini_block_fisher`.

    Attributes:
      count: ``()`` int32, number of updates so far.
      curvature: :class:`MiniBlockFisherCurvature`.
      fallback_state: :class:`sofim_optax.layerwise.FallbackState` of the transformation
        that handles the parameters no captured layer covers (by default
        :func:`scale_by_diagonal_fisher`).
      skipped: :class:`sofim_optax.guards.SkipCounts`, how many steps, statistics updates
        and refreshes were skipped because they were non-finite (the state kept its last good
        values).
    """

    count: jax.Array
    curvature: MiniBlockFisherCurvature
    fallback_state: layerwise.FallbackState
    skipped: guards.SkipCounts


class GradientMomentumState(NamedTuple):
    """State of :func:`mini_block_fisher`'s first stage: momentum, then the preconditioner."""

    momentum: Any
    inner: Any


# --------------------------------------------------------------------------------------
# The method.
# --------------------------------------------------------------------------------------


def _mbf_method(damping, ema, dense_block_size, inverse, batch_chunk) -> layerwise.LayerwiseMethod:
    eigh = inverse == "eigh"

    def layout_of(param_layout):
        return BlockLayout.build(param_layout, dense_block_size)

    def init(param_layout, dtype):
        bl = layout_of(param_layout)
        return MiniBlockFisherCurvature(
            stat_updates=jnp.zeros((len(param_layout.layers),), jnp.int32),
            blocks=bl.packed_zeros(dtype),
            eigvals=bl.vectors(dtype) if eigh else {},
            eigvecs=bl.eyes(dtype) if eigh else {},
            inverses={} if eigh else bl.eyes(dtype),
        )

    def update_statistics(curv, param_layout, stats, **extra):
        del extra
        if not stats:
            return curv
        bl = layout_of(param_layout)
        k = curv.stat_updates
        dtype = next(iter(curv.blocks.values())).dtype
        fresh = {
            i: batch_blocks(bl.blockings[i], st.inputs, st.output_grads, dtype, batch_chunk)
            for i, st in stats.items()
        }

        def running_average(i, segment, old):
            decay = layerwise.ema_decay(k[i] + 1, ema, dtype)
            return decay * old + (1 - decay) * fresh[i][segment]

        active = jnp.asarray(sorted(stats), jnp.int32)
        return curv._replace(
            stat_updates=k.at[active].set(optax.safe_increment(k[active])),
            blocks=bl.update_in_place(curv.blocks, list(stats), running_average),
        )

    def damping_of(dtype):
        return jnp.maximum(jnp.asarray(damping).astype(dtype), linalg.DAMPING_FLOOR)

    def refresh(curv, param_layout, **extra):
        del extra
        bl = layout_of(param_layout)
        dtype = next(iter(curv.blocks.values())).dtype if curv.blocks else jnp.float32
        masks = {i: b.pad_mask(dtype) for i, b in enumerate(bl.blockings) if b.padding}
        pads = (
            bl.assemble(
                {
                    i: [
                        jnp.zeros((c, s), dtype) if m is None else m
                        for m, (s, c) in zip(ms, bl.blockings[i].segments)
                    ]
                    for i, ms in masks.items()
                },
                None,
                lambda count, size: jnp.zeros((count, size), dtype),
            )
            if masks
            else None
        )

        def decoupled(k, f):
            # The padded rows and columns of a dense chunk are exactly zero: 1 on their
            # diagonal keeps them decoupled from the real coordinates (their input is 0).
            if pads is not None and any(e[0] in masks for e in bl.entries[k]):
                f = f + pads[k][:, :, None] * jnp.eye(f.shape[-1], dtype=f.dtype)
            return f

        blocks = {k: decoupled(k, unpack(f, bl.dims[k])) for k, f in curv.blocks.items()}
        if eigh:
            # The undamped blocks' eigendecompositions; λ is applied in `precondition`.
            eig = distributed.map_stacks(jnp.linalg.eigh, blocks)
            return curv._replace(
                eigvals={k: jnp.maximum(w, 0.0) for k, (w, _) in eig.items()},
                eigvecs={k: q for k, (_, q) in eig.items()},
            )
        lam = damping_of(dtype)

        shifts = {k: jnp.full((f.shape[0],), lam, f.dtype) for k, f in blocks.items()}
        return curv._replace(inverses=layerwise.stacked_damped_inverses(blocks, shifts, inverse))

    def apply(curv, k, v):
        """``(F_b + λI)⁻¹ v_b`` for every block of the stack ``k``; ``v`` is ``(n_s, s)``."""
        if not eigh:
            return jnp.einsum("bij,bj->bi", curv.inverses[k], v)
        w, q = curv.eigvals[k], curv.eigvecs[k]
        rotated = jnp.einsum("bji,bj->bi", q, v) / (w + damping_of(w.dtype))
        return jnp.einsum("bij,bj->bi", q, rotated)

    def precondition(curv, param_layout, grads, **extra):
        del extra
        bl = layout_of(param_layout)
        dtype = next(iter(grads.values())).dtype
        parts = {i: bl.blockings[i].blockify(v) for i, v in grads.items()}
        vecs = bl.assemble(parts, None, lambda count, size: jnp.zeros((count, size), dtype))
        out_stacks = {k: apply(curv, k, v) for k, v in vecs.items()}
        split = bl.split(out_stacks, list(grads))
        return {i: bl.blockings[i].deblockify(split[i]) for i in grads}, curv

    # kind_sensitive: the partition of a kernel differs for a dense map and a convolution.
    return layerwise.LayerwiseMethod(
        init, update_statistics, refresh, precondition, kind_sensitive=True
    )


# --------------------------------------------------------------------------------------
# Diagonal fallback.
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Public transformations.
# --------------------------------------------------------------------------------------


@hp.structural("dense_block_size", "batch_chunk")
def scale_by_mini_block_fisher(
    *,
    damping: Scalar = 1e-2,
    ema: Scalar = 0.9,
    stats_period: int | jax.Array = 20,
    inverse_period: int | jax.Array = 100,
    dense_block_size: int | None = DEFAULT_DENSE_BLOCK_SIZE,
    inverse: str = "cholesky",
    batch_chunk: int | None = None,
    fallback: optax.GradientTransformation | str | None = "diagonal",
    kernel_output_axes: Mapping[str, int] | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition each captured layer's gradient by its damped mini-block empirical Fisher.

    For a captured layer with gradient matrix ``V = [∇kernel.reshape(-1, d_out); ∇bias]``
    (``d_a × d_out``) the parameters are partitioned into **mini-blocks** ``b``:

    * convolution, kernel ``(k_1, …, k_r, c_in, c_out)``: one block of the ``k = k_1⋯k_r``
      kernel weights of each (input channel, output channel) pair, ``c_in·c_out`` blocks of
      ``k × k`` (9×9 for 3×3 kernels), plus one ``1×1`` block per bias entry;
    * dense, kernel ``(d_in, d_out)``: for each output unit ``j`` the column ``V[:, j]`` (its
      ``d_in`` incoming weights followed by its bias), cut into ``⌈d_a/B⌉`` chunks of equal size
      ``≤ B = dense_block_size`` (the last one zero-padded; ``B = None``: one block of ``d_a``
      per unit);
    * embedding table ``(V, D)`` (``Embed``, captured as one-hot rows): each row (one
      token's vector) cut into ``⌈D/B⌉`` chunks of equal size ``≤ B``, ``V·⌈D/B⌉`` blocks.

    With ``v_n = Σ_t ā_{n,t} g_{n,t}ᵀ`` the gradient matrix of example ``n``'s loss (``ā`` the
    input or conv patch with a 1 appended for the bias, ``g`` = ``LayerStats.output_grads``,
    the per-example-loss gradient of the layer output, ``t`` over conv positions), each
    block's **empirical Fisher** and its EMA are

    .. math::

        \hat F_b = \frac1N \sum_n v_{n,b} v_{n,b}^\top,\qquad
        F_b \leftarrow \rho F_b + (1-\rho) \hat F_b,\qquad \rho = \min(1 - 1/k,\ \text{ema}),

    (``k`` counting the layer's statistics updates; for a dense block
    ``F̂_{(j,c)} = mean_n g_{n,j}² ā_{n,c} ā_{n,c}ᵀ``), computed by einsums over chunks of the
    batch without materialising all per-example gradients at once
    (:func:`batch_blocks`). The update returned (no learning rate, no sign) is

    .. math::

        \Delta_b = (F_b + \lambda I)^{-1} u_b

    for the incoming vector ``u`` (the gradient, or in :func:`mini_block_fisher` its momentum).
    Every parameter not covered by a captured layer goes to ``fallback``, by default
    :func:`scale_by_diagonal_fisher` (``1×1`` blocks ``u_i / (ν_i + λ)``, ``ν`` an EMA of the
    squared minibatch gradient, because per-example gradients are not captured for them).

    Blocks of the same size (across layers) are stacked (:class:`MiniBlockFisherCurvature`)
    and decomposed at each refresh in one batched call per size (``vmap``-ed, or ``lax.map``-ped
    one block at a time on CPU with jaxlib < 0.11 to avoid a LAPACK deadlock), the sizes one
    after another; what is stored depends on ``inverse``:

    * ``"cholesky"`` (default) and ``"inv"``: the damped inverses ``(F_b + λI)⁻¹``
      (:func:`sofim_optax.layerwise.stacked_damped_inverse`; a Cholesky breakdown falls back
      to the eigendecomposition, so nothing turns NaN), applied as one batched matrix-vector
      product per size. ``λ`` is baked into them: **a changed damping takes effect at the next
      inverse refresh**, not before.
    * ``"eigh"``: the eigendecompositions ``F_b = Q_b diag(w_b) Q_bᵀ`` of the undamped blocks
      (``w_b`` clamped at 0), and each step applies
      ``(F_b + λI)⁻¹ u_b = Q_b diag(1/(w_b + λ)) Q_bᵀ u_b`` (two batched products per size).
      **A changed damping takes effect at the very next step** (e.g. a schedule or an adaptive
      damping through ``optax.inject_hyperparams``).

    The zero-padded coordinates of a dense chunk (their rows and columns of ``F_b`` are zero)
    get a 1 on the diagonal before the decomposition, so they stay decoupled from the real
    coordinates; their entries of ``u_b`` are zero and are dropped from the result.

    Schedule: on update ``count`` (0-based) the statistics are refreshed when ``count %
    stats_period == 0``, then the inverses or eigendecompositions when ``count %
    inverse_period == 0`` (both at ``count = 0``), under ``lax.cond``.

    Departures and choices (``docs/methods/mini_block_fisher.md``): the conv blocks (one per
    channel pair) and dense blocks (one per output unit with its bias) are our reading of the
    paper's "many mini-blocks of modest size"; chunking the dense blocks is ours, so that the
    784-1000-… autoencoder fits in memory (see
    :data:`sofim_optax.mini_blocks.DEFAULT_DENSE_BLOCK_SIZE` for the arithmetic); conv biases
    get exact 1×1 EF blocks (their per-example gradient is ``Σ_t g_{n,t}``); other parameters
    use squared minibatch gradients; damping is Tikhonov ``λI`` on every block.

    Args:
      damping: ``λ`` (default ``1e-2``), added to every block, ``> 0`` (``0`` is refused: a
        block estimated from a minibatch is singular; a traced value is floored at
        ``linalg.DAMPING_FLOOR``). On Fashion-MNIST with ``SmallCNN`` (mean cross-entropy,
        batch 128) ``1e-3`` diverged at learning rates 0.003 and 0.01 and ``1e-2`` trained
        (``experiments/benchmark_mbf.py``). On the EF's scale: a loss summed over many outputs (the
        autoencoder's 784 pixels) has a much larger EF than a mean cross-entropy and wants a
        larger ``λ``. With ``inverse="eigh"`` it is applied at every step (a change takes
        effect at once); with ``"cholesky"``/``"inv"`` it is baked into the inverses (a change
        takes effect at the next inverse refresh). The diagonal fallback applies it at every
        step.
      ema: upper bound of the EMA decay of the blocks (default ``0.9``, the authors' group's
        value in their TNT code).
      stats_period: refresh the statistics every this many updates (default ``20``: the
        per-example blocks of one update cost about six gradients on the deep autoencoder;
        pass ``layer_stats`` on every update anyway, its keys select the preconditioned
        layers).
      inverse_period: refresh the inverses (or eigendecompositions) every this many updates
        (default ``100``). With both defaults, 312 steps on the Fashion-MNIST MLP end 0.4%
        lower than with both periods at 1; statistics every 50 ended 1.8% higher. At a
        learning rate near the edge of stability (0.01 on a small autoencoder) it diverged
        unless refreshed often (statistics every update, inverses every 5): see
        docs/benchmarks.md.
      dense_block_size: maximum dense block size ``B`` (default ``32``, see
        :data:`sofim_optax.mini_blocks.DEFAULT_DENSE_BLOCK_SIZE` for the memory arithmetic);
        ``None`` for whole columns (``d_in + 1`` entries: ``d_in + 1`` floats per parameter,
        twice). It fixes the shapes of the state, so under ``optax.inject_hyperparams`` list it
        in ``static_args`` (as ``batch_chunk`` when given).
      inverse: ``"cholesky"`` (default), ``"inv"`` or ``"eigh"``. ``"cholesky"`` (Cholesky
        factorisation, then triangular solves against ``I``) and ``"inv"`` (LU) store the
        damped inverses: cheapest per step, but a damping change waits for the next inverse
        refresh. ``"eigh"`` stores eigenvalues and eigenvectors of the undamped blocks (one
        ``s``-vector more per block) and applies the damping at every step, at twice the
        matrix-vector work per step and a costlier refresh; a damping change acts at once.
      batch_chunk: examples per chunk of the statistics einsums (default ``None``: as many as
        keep the temporaries near 2²⁵ floats).
      fallback: transformation for the parameters no captured layer covers: ``"diagonal"``
        (default) for :func:`scale_by_diagonal_fisher` with the same ``damping`` and ``ema``,
        refreshed every step (see :func:`sofim_optax.diagonal_fisher.resolve_fallback`);
        ``None`` for the identity; or any optax transformation.
      kernel_output_axes: ``{layer path: number of output axes}`` for dense maps over several
        axes that the parameter tree cannot tell from a convolution (a ``DenseGeneral`` /
        ``LinearGeneral`` over several input axes, such as attention's output projection, or a
        bias-less one with several output axes); listed layers get the dense blocks. A layer
        that needs an entry is refused at trace time with the entry in the message. Rules:
        :func:`sofim_optax.layerwise.discover_layers`. Default ``None``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params=None,
      *, layer_stats, gradients=None)`` requires ``layer_stats`` (``dict[str, LayerStats]``,
      e.g. from ``sofim_optax.curvature.linen.value_grad_and_stats``); ``gradients`` (the raw
      minibatch gradient, when ``updates`` is something else such as a momentum) feeds the
      diagonal fallback. Errors about the statistics are raised at trace time and name the
      layer. Updates come back in each leaf's dtype; statistics, inverses and
      eigendecompositions are float32 (float64 for float64 kernels).

    References:
      Bahamou, Goldfarb & Ren, `A Mini-Block Fisher Method for Deep Neural Networks
      <https://arxiv.org/abs/2202.04124>`_, AISTATS 2023.
    """
    where = "scale_by_mini_block_fisher"
    hp.check_choice(where, "inverse", inverse, _INVERSES)
    hp.check_decay(where, "ema", ema)
    hp.check_damping(where, damping)
    for arg, value in (("dense_block_size", dense_block_size), ("batch_chunk", batch_chunk)):
        if value is not None:  # they fix the shapes of the state
            hp.check_positive_int(where, arg, value, static=True)
    fallback = resolve_fallback(where, fallback, damping=damping, ema=ema)
    return layerwise.layerwise_transformation(
        name="scale_by_mini_block_fisher",
        method=_mbf_method(damping, ema, dense_block_size, inverse, batch_chunk),
        state_cls=ScaleByMiniBlockFisherState,
        stats_period=stats_period,
        inverse_period=inverse_period,
        fallback=fallback,
        kernel_output_axes=kernel_output_axes,
    )


def _gradient_momentum_first(
    inner: optax.GradientTransformationExtraArgs, gradient_momentum: Scalar, nesterov: bool
) -> optax.GradientTransformationExtraArgs:
    """``m ← g + μ m`` (``optax.trace``), then ``inner`` on ``m`` with ``gradients=g``."""
    tr = optax.trace(decay=gradient_momentum, nesterov=nesterov)

    def init_fn(params):
        return GradientMomentumState(momentum=tr.init(params), inner=inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        m, ts = tr.update(updates, state.momentum, params)
        out, inner_state = inner.update(m, state.inner, params, gradients=updates, **extra)
        return out, GradientMomentumState(momentum=ts, inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, distributed.mesh_agnostic(update_fn))


def _gradient_momentum_chain(
    scale: optax.GradientTransformationExtraArgs,
    *,
    learning_rate: ScalarOrSchedule,
    gradient_momentum: Scalar | None,
    weight_decay: Scalar,
    weight_decay_mask: Any,
    nesterov: bool,
) -> optax.GradientTransformationExtraArgs:
    """``trace(gradient_momentum)`` (the raw gradient also handed over as ``gradients=``), then
    ``scale``, decoupled weight decay and the learning rate."""
    first = (
        scale
        if gradient_momentum is None
        else _gradient_momentum_first(scale, gradient_momentum, nesterov)
    )
    return optax.chain(
        first,
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


_MINI_BLOCK_FISHER_DOC = r"""Mini-Block Fisher: momentum on the gradient, then the preconditioner.

    .. math::

        m_t &= g_t + \mu\, m_{t-1}\\
        \Delta_t &= (F_b + \lambda I)^{-1} m_{t,b}
            \quad\text{per mini-block } b\ (\mathtt{scale\_by\_mini\_block\_fisher})\\
        w_{t+1} &= w_t - \eta_t\,(\Delta_t + \mathrm{weight\_decay}\cdot w_t)

    i.e. ``trace(gradient_momentum)`` → :func:`scale_by_mini_block_fisher` (which also receives the raw
    gradient as ``gradients=``, for its diagonal fallback's statistics) →
    ``add_decayed_weights(weight_decay)`` → ``scale_by_learning_rate``. Momentum before the
    preconditioner with dampening 0, and weight decay decoupled and scaled by the learning
    rate, follow the public code of the authors' group (TNT, Ren & Goldfarb 2021); the MBF
    paper does not state its own. The momentum is named ``gradient_momentum`` because it acts
    on the raw gradient, before the preconditioner (``momentum`` in KFAC and the KPSVD family
    acts on the preconditioned direction).

    Args:
      learning_rate: ``η``, a float or an optax schedule.
      gradient_momentum: ``μ`` (default ``0.9``), heavy-ball momentum of the gradient before
        preconditioning; ``None`` for none.
      weight_decay: decoupled weight decay (default ``0.0``).
      weight_decay_mask: optional mask for ``add_decayed_weights`` (default ``None``: all).
      nesterov: Nesterov momentum (default ``False``).

    {scale_by_arguments}

    Returns:
      An ``optax.GradientTransformationExtraArgs``; pass ``layer_stats=`` to its ``update``.

    References:
      Bahamou, Goldfarb & Ren, `A Mini-Block Fisher Method for Deep Neural Networks
      <https://arxiv.org/abs/2202.04124>`_, AISTATS 2023.
    """

mini_block_fisher = aliases.make_alias(
    scale_by_mini_block_fisher,
    _gradient_momentum_chain,
    name="mini_block_fisher",
    doc=_MINI_BLOCK_FISHER_DOC,
    alias_arguments={
        "gradient_momentum": 0.9,
        "weight_decay": 0.0,
        "weight_decay_mask": None,
        "nesterov": False,
    },
)


#: Short alias of :func:`mini_block_fisher`.
mbf = mini_block_fisher
