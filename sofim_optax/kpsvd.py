"""KPSVD: the Fisher block's nearest Kronecker product by power SVD (Koroko et al. 2022, §3.1).

A thin module: the method is one :class:`sofim_optax._kronecker_svd_family.FamilyConfig`; the
shared code is in :mod:`sofim_optax._kronecker_svd_family` and :mod:`sofim_optax._kronecker`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from sofim_optax import _kronecker as kron
from sofim_optax import _kronecker_svd_family as family
from sofim_optax._kronecker_svd_family import KroneckerSvdCurvature

__all__ = ["ScaleByKpsvdState", "scale_by_kpsvd", "kpsvd"]


class ScaleByKpsvdState(NamedTuple):
    """State of :func:`scale_by_kpsvd`.

    Attributes:
      count: ``()`` int32, number of updates so far.
      curvature: :class:`sofim_optax._kronecker_svd_family.KroneckerSvdCurvature`.
      fallback_state: the fallback transformation's state (see :func:`sofim_optax.scale_by_kfac`).
    """

    count: jax.Array
    curvature: KroneckerSvdCurvature
    fallback_state: kron.FallbackState


def scale_by_kpsvd(
    damping: Any = 1e-3,
    ema: Any = 0.95,
    stats_period: Any = 1,
    inverse_period: Any = 20,
    pi_adjusted: bool = True,
    tol: Any = 1e-5,
    max_iters: int = 100,
    fallback: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Precondition each captured layer's gradient by the damped inverse of its KPSVD approximation.

    KFAC approximates a layer's Fisher block ``F = mean_n (ā_n ā_nᵀ) ⊗ (g_n g_nᵀ)`` by
    ``mean(āāᵀ) ⊗ mean(ggᵀ)``, which is not the closest Kronecker product. KPSVD (Koroko et
    al. 2022) uses the closest one in Frobenius norm,

    .. math::

        (\hat R, \hat S) = \arg\min_{R,S} \|F - R\otimes S\|_F ,

    the top singular triplet of the Van Loan–Pitsianis rearrangement ``𝓡(F)``, by power
    iteration with the matrix-free products ``𝓡(F)vec(V) = vec(mean_n (g_nᵀVg_n) ā_nā_nᵀ)``,
    ``𝓡(F)ᵀvec(U) = vec(mean_n (ā_nᵀUā_n) g_ng_nᵀ)`` (never forming ``F``;
    :func:`sofim_optax.linalg.nearest_kronecker`), split as ``R̂ = √σ mat(u)``,
    ``Ŝ = √σ mat(v)``. Warm-started from the averaged ``S`` (from the identity on the first
    update), so the iterates, and the factors, stay positive semi-definite. The factors are
    averaged separately, ``R ← ρR + (1−ρ)R̂``, ``S ← ρS + (1−ρ)Ŝ``, ``ρ = min(1 − 1/k, ema)``,
    and the update is KFAC's with ``R, S`` in place of ``A, G`` (no learning rate, no sign):

    .. math::

        \Delta = (R + \pi\sqrt\lambda I)^{-1}\, V\, (S + \tfrac{\sqrt\lambda}{\pi} I)^{-1},
        \qquad \pi = \sqrt{\frac{\operatorname{tr}R/d_a}{\operatorname{tr}S/d_g}} ,

    from eigendecompositions refreshed every ``inverse_period`` steps (the damping applies at
    every step, so a schedule on it through ``optax.inject_hyperparams`` acts at once).

    Args:
      damping: ``λ`` (default ``1e-3``), floored at ``linalg.DAMPING_FLOOR``; on the Fisher's
        scale (see :func:`sofim_optax.scale_by_kfac` on how the loss normalisation sets it).
        Factored Tikhonov damping of the Kronecker product: ``π√λ`` on the input side, ``√λ/π`` on the
        output side.
      ema: upper bound of the factors' EMA decay ``ρ = min(1 − 1/k, ema)`` (default ``0.95``,
        the paper's).
      stats_period: recompute the factors every this many updates (default ``1``; the paper
        uses 100 for both periods). Pass ``layer_stats`` on every update anyway.
      inverse_period: refresh the eigendecompositions of ``R, S`` every this many updates (default ``20``).
      pi_adjusted: balance the damping with ``π = sqrt((tr R/d_a)/(tr S/d_g))``
        (default ``True``; ``False``: ``√λ`` on both sides).
      tol: relative stopping tolerance of the power iteration (default ``1e-5``; the paper's
        ``1e-6`` is absolute, see :func:`sofim_optax.linalg.nearest_kronecker`).
      max_iters: cap on power iterations per statistics update (default ``100``; the paper's 1000). The
        warm start from the averaged factors usually converges in a few; the cost is
        proportional to the iterations actually run (``lax.while_loop``), recorded in
        ``state.curvature.solver_iterations``.
      fallback: transformation for the parameters no captured layer covers (default ``None``:
        identity); see :func:`sofim_optax.scale_by_kfac`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state, params=None,
      *, layer_stats, **extra)`` requires ``layer_stats`` (``dict[str, LayerStats]``, e.g. from
      ``sofim_optax.curvature.linen.value_grad_and_stats(..., fisher="sampled", rng=key)``);
      errors (missing statistics, unknown layer, shapes) are raised at trace time and name the
      layer. Updates come back in each gradient leaf's dtype; statistics, SVDs and solves run
      in float32 (float64 for float64 kernels). Layers, schedule, stacking and fallback work as
      in :func:`sofim_optax.scale_by_kfac`; the conv-layer Fisher and the shared choices are
      described in :mod:`sofim_optax._kronecker_svd_family`.

    References:
      Koroko, Anciaux-Sedrakian, Ben Gharbia, Garès, Haddou, Tran, `Efficient Approximations of
      the Fisher Matrix in Neural Networks using Kronecker Product Singular Value Decomposition
      <https://arxiv.org/abs/2201.10285>`_, ESAIM: Proceedings and Surveys 73, 2023.
      Van Loan & Pitsianis, Approximation with Kronecker products, 1993.
    """
    cfg = family.FamilyConfig(
        kind="kpsvd", damping=damping, ema=ema, pi_adjusted=pi_adjusted, tol=tol,
        max_iters=max_iters, krylov_dim=None, indefinite="abs",
    )
    return family.transformation(
        "scale_by_kpsvd", ScaleByKpsvdState, cfg, stats_period, inverse_period, fallback
    )


def kpsvd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: Any = 0.9,
    damping: Any = 1e-3,
    weight_decay: Any = 0.0,
    ema: Any = 0.95,
    stats_period: Any = 1,
    inverse_period: Any = 20,
    pi_adjusted: bool = True,
    tol: Any = 1e-5,
    max_iters: int = 100,
    fallback: optax.GradientTransformation | None = None,
    nesterov: bool = False,
    weight_decay_mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""KPSVD with heavy-ball momentum on the preconditioned direction.

    ``optax.chain(scale_by_kpsvd(...), add_decayed_weights(weight_decay), trace(momentum),
    scale_by_learning_rate(learning_rate))``, as :func:`sofim_optax.kfac`: weight decay added
    after preconditioning and SGD momentum, as in the authors' driver (PyTorch SGD after the
    preconditioner). The authors' KL-clipping of the step (``ν = min(1, sqrt(κ/Σ|⟨∇, Δ⟩|))``) is
    not included; chain it yourself if wanted.

    Args:
      learning_rate: ``η``, a float or an optax schedule.
      momentum: ``μ`` (default ``0.9``, the paper's); ``None`` for none.
      damping: ``λ`` (default ``1e-3``).
      weight_decay: decoupled weight decay (default ``0.0``; the paper uses ``1e-3``).
      ema, stats_period, inverse_period, pi_adjusted, tol, max_iters, fallback:
        see :func:`scale_by_kpsvd`.
      nesterov: Nesterov momentum (default ``False``).
      weight_decay_mask: optional mask for ``add_decayed_weights``.
    """
    return kron.momentum_alias(
        scale_by_kpsvd(
            damping=damping, ema=ema, stats_period=stats_period, inverse_period=inverse_period,
            pi_adjusted=pi_adjusted, tol=tol, max_iters=max_iters, fallback=fallback,
        ),
        learning_rate, momentum, weight_decay, nesterov, weight_decay_mask,
    )
