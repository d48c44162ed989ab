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
import optax

from sofim_optax import aliases, diagonal_fisher, guards, layerwise
from sofim_optax import hyperparameters as hp
from sofim_optax.hyperparameters import Scalar, ScalarOrSchedule
from sofim_optax.kbfgs_curvature import KbfgsCurvature, forget_previous, make_method
from sofim_optax.kfac import DEFAULT_MAX_FACTOR_DIM

__all__ = [
    "KbfgsCurvature",
    "ScaleByKbfgsState",
    "scale_by_kbfgs",
    "kbfgs",
    "kbfgs_l",
]

_NAME = "scale_by_kbfgs"


class ScaleByKbfgsState(NamedTuple):
    """State of :func:`scale_by_kbfgs`.

    Attributes:
      count: ``()`` int32, number of updates so far.
      curvature: :class:`KbfgsCurvature`.
      fallback_state: :class:`sofim_optax.layerwise.FallbackState`.
      skipped: :class:`sofim_optax.guards.SkipCounts`, how many steps, statistics updates
        and refreshes were skipped because they were non-finite (the state kept its last good
        values).
    """

    count: jax.Array
    curvature: KbfgsCurvature
    fallback_state: layerwise.FallbackState
    skipped: guards.SkipCounts

    def after_skipped_step(self) -> ScaleByKbfgsState:
        """Called by the step guard (:mod:`sofim_optax.guards`) on a skipped step: no (s, y)
        pair is formed at the next update (see :func:`forget_previous`)."""
        return self._replace(curvature=forget_previous(self.curvature))


@hp.structural("memory", "max_factor_dim")
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
    fallback: optax.GradientTransformation | str | None = "diagonal",
    kernel_output_axes: Mapping[str, int] | None = None,
    max_factor_dim: int | None = None,
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

    1. **H_g** (skipped at a layer's first step, whose ``previous_batch_stats`` are ignored):
       the pair of the *previous* minibatch ``B_{t-1}`` between its own parameters ``θ_{t-1}`` and
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
        next damping (``H_a`` is inverted exactly only at the first step). ``> 0``: ``0`` is
        refused (``A`` from a minibatch is singular); a traced value is floored at
        ``linalg.DAMPING_FLOOR``.
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
      fallback: transformation for the parameters no captured layer covers (default
        ``"diagonal"``: :func:`sofim_optax.diagonal_fisher.scale_by_diagonal_fisher` with the
        same ``damping`` and ``ema``, applied to the incoming vector; ``None``: identity); see
        :func:`sofim_optax.scale_by_kfac`.
      kernel_output_axes: ``{layer path: number of output axes}`` for a bias-less
        ``DenseGeneral`` with several output axes (see :func:`sofim_optax.scale_by_kfac`).
        Default ``None``.
      max_factor_dim: a layer whose ``d_a`` or ``d_g`` exceeds it (a vocabulary-sized head)
        takes the fallback path, with an INFO log line, so that no dense ``H_a`` or ``H_g`` of
        it is formed; ``None`` (default) means :data:`sofim_optax.kfac.DEFAULT_MAX_FACTOR_DIM`
        ``= 4096`` (a number given through ``optax.inject_hyperparams`` must be listed in its
        ``static_args``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params=None,
      *, layer_stats, previous_batch_stats)`` requires both statistics on every call:
      ``layer_stats`` (this minibatch at the current parameters, with ``outputs``) and
      ``previous_batch_stats`` (the previous minibatch at the current parameters, with
      ``outputs`` and the same layer keys;
      :func:`sofim_optax.curvature.two_pass.two_pass_value_grad_and_stats` computes both). At
      the first step there is no previous minibatch: pass statistics of the right shapes, such
      as ``previous_batch_stats=layer_stats``; they are ignored (nothing is stored to pair them
      with). Omitting ``previous_batch_stats`` is a ``ValueError``: K-BFGS would otherwise
      never update ``H_g``. Errors (missing statistics, unknown keys, shapes, missing
      ``outputs``, different layers in the two statistics) are raised at trace time and name
      the argument and the layer.

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
        method=make_method(
            damping, mu1, mu2, ema, pair_ema, memory, hg_init, skip_threshold, lbfgs_method
        ),
        state_cls=ScaleByKbfgsState,
        stats_period=1,
        inverse_period=1,
        fallback=diagonal_fisher.resolve_fallback(_NAME, fallback, damping=damping, ema=ema),
        kernel_output_axes=kernel_output_axes,
        max_factor_dim=DEFAULT_MAX_FACTOR_DIM if max_factor_dim is None else max_factor_dim,
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

    {scale_by_arguments}

    Returns:
      An ``optax.GradientTransformationExtraArgs``; call ``update(grads, state, params,
      layer_stats=..., previous_batch_stats=...)``, both on every step (at the first, pass
      ``previous_batch_stats=layer_stats``: they are ignored; see :func:`scale_by_kbfgs`).

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

    ``H_a`` stays the dense Hessian-action BFGS matrix, as in the authors' code; the chain is
    :func:`kbfgs`'s (coupled L2, gradient EMA, the preconditioner, the learning rate).

    Args:
      learning_rate: ``η``, a float or an optax schedule (as :func:`kbfgs`).
      gradient_ema: ``μ``, EMA decay of the gradient before preconditioning (default ``0.9``);
        ``None`` for none.
      weight_decay: coupled L2 ``τ`` (default ``0.0``; ``1e-5`` in the paper).
      weight_decay_mask: optional mask for ``add_decayed_weights`` (default ``None``: all).
      memory: L-BFGS pairs per layer (default ``100``, the authors'). It fixes the shapes of
        the state: under ``optax.inject_hyperparams`` list it in ``static_args``.

    {scale_by_arguments}

    References:
      Goldfarb, Ren & Bahamou, `Practical Quasi-Newton Methods for Training Deep Neural
      Networks <https://arxiv.org/abs/2006.08877>`_, NeurIPS 2020.
    """

kbfgs_l = aliases.make_alias(
    scale_by_kbfgs,
    _gradient_ema_chain,
    name="kbfgs_l",
    doc=_KBFGS_L_DOC,
    alias_arguments=_KBFGS_ALIAS_ARGUMENTS,
    overrides={"memory": 100},
)
