r"""The curvature of the KPSVD family (KPSVD, Deflation, KFAC-corrected, Lanczos): state and method.

The public transformations are in :mod:`sofim_optax.kpsvd`; this module holds what they share.

Koroko, Anciaux-Sedrakian, Ben Gharbia, Garès, Haddou, Tran, "Efficient Approximations of the
Fisher Matrix in Neural Networks using Kronecker Product Singular Value Decomposition"
(arXiv 2201.10285; ESAIM: Proceedings and Surveys 73, 2023).

The four methods differ only in how a layer's Fisher block is approximated:

============== ======================================= ======================================
method         approximation of F                      computed by
============== ======================================= ======================================
KPSVD          ``R ⊗ S``                                power SVD of ``𝓡(F)`` (rank 1)
Deflation      ``R1 ⊗ S1 + R2 ⊗ S2``                    power SVD, deflated for the 2nd term
KFAC-corrected ``A ⊗ G + R ⊗ S``                        KFAC's ``A, G`` + power SVD of
                                                        ``𝓡(F) − vec(A) vec(G)ᵀ``
Lanczos        ``R1 ⊗ S1 + R2 ⊗ S2``                    restarted Golub–Kahan–Lanczos
============== ======================================= ======================================

Everything else is shared here and with KFAC through :mod:`sofim_optax.layerwise` (layer
discovery, statistics checks, periods under ``lax.cond``, EMA decay ``min(1 − 1/k, ema)``,
stacking of equal-size factors, fallback, dtypes).

**The Fisher block of a layer.** ``F = mean_n (ā_n ā_nᵀ) ⊗ (g_n g_nᵀ)`` with ``ā`` the
homogeneous input (bias coordinate last, :func:`sofim_optax.layerwise.homogeneous_inputs`)
and ``g`` the per-example pre-activation gradient (``LayerStats.output_grads``). For a
convolution (statistics ``(N, T, ·)``, ``T`` output positions) the paper's MLP formula is
extended the KFC way (Grosse & Martens 2016), consistently with KFAC's
:func:`~sofim_optax.layerwise.input_factor` / :func:`~sofim_optax.layerwise.output_factor`:
positions are treated as extra samples and cross-position terms are dropped (KFC's "spatially
uncorrelated derivatives"), with KFC's scaling,

.. math::

    F_{\mathrm{conv}} = \frac1N \sum_{n,t} (\bar a_{n,t}\bar a_{n,t}^\top)\otimes(g_{n,t}g_{n,t}^\top)
    = \operatorname{mean}_{n,t} (\bar a_{n,t}\bar a_{n,t}^\top)
      \otimes(\sqrt T g_{n,t})(\sqrt T g_{n,t})^\top ,

i.e. :func:`layer_samples` hands ``N·T`` samples ``(ā_{n,t}, √T g_{n,t})`` to
:func:`sofim_optax.linalg.nearest_kronecker`; KFAC's ``A ⊗ G`` is then exactly the
"independence" factorisation of this ``F``. (The authors' CNN code instead keeps
cross-position terms within a radius; we do not, for consistency with KFAC and because it
would multiply the cost by the number of neighbours.)

**Statistics update** (every ``stats_period`` steps): the fresh minibatch factors are computed
matrix-free, warm-started from the current EMA factors ``S_k`` (the PSD default start on the
first update), and the factors are averaged **separately**, ``R_k ← ρR_k + (1−ρ)R̂_k``,
``S_k ← ρS_k + (1−ρ)Ŝ_k`` with ``ρ = min(1 − 1/k, ema)`` (paper §3.3; note that the product of
the averages is not the average of the products). Each fresh pair is sign-aligned with its
warm start so that averaging never mixes ``(R, S)`` with ``(−R, −S)``.

**Inverse refresh** (every ``inverse_period`` steps). Rank one (KPSVD): eigendecompositions of
``R, S`` as KFAC's ``"eigh"`` path; the update is ``(R + π√λ I)⁻¹ V (S + (√λ/π) I)⁻¹`` with the
damping applied at every step. Rank two: simultaneous diagonalisation
(:func:`sofim_optax.linalg.kron_sum_factors`) of the damped first term and the second term,
``X = K1 [(K1ᵀ V K2) ⊘ D] K2ᵀ`` (:func:`sofim_optax.linalg.kron_sum_apply`); the damping is
baked in at the refresh, so a changed ``damping`` takes effect at the next refresh. It cannot
be applied later: ``K1, s1`` diagonalise the pencil ``(A1 + π√λ I, A2)``, whose generalised
eigenvectors move with ``λ`` unless ``A1`` and ``A2`` commute (likewise on the output side),
so a new ``λ`` costs the refresh's two ``eigh`` per factor.

Damping rule, same for the whole family (a departure from the authors' code, which damps the
rank-two first factors by the full ``λ`` each): factored Tikhonov damping ``π√λ``, ``√λ/π`` on
the two factors of the first (PSD) term, nothing on the second term. Indefinite second terms:
see ``indefinite``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sofim_optax import hyperparameters as hp
from sofim_optax import layerwise, linalg

__all__ = [
    "KroneckerSvdCurvature",
    "FamilyConfig",
    "KINDS",
    "layer_samples",
    "make_method",
    "transformation",
]

#: The family's members, the values of :attr:`FamilyConfig.kind`.
KINDS = ("kpsvd", "deflation", "kfac_corrected", "lanczos")


class KroneckerSvdCurvature(NamedTuple):
    """Curvature state of the KPSVD family; every field is an array or a dict of arrays.

    Factors are stacked per dimension like KFAC's (:class:`sofim_optax.layerwise.FactorLayout`,
    keys ``"d{d}"``), in layer-path order then role order.

    Attributes:
      stat_updates: ``(n_layers,)`` int32, statistics updates received by each layer.
      factors: the EMA factors. Roles ``("A1", "G1")`` for KPSVD (``R``, ``S``) and
        ``("A1", "G1", "A2", "G2")`` for the rank-two methods (Deflation/Lanczos: ``R1, S1, R2,
        S2``; KFAC-corrected: KFAC's ``A, G``, then the correction ``R, S``). ``A*`` are
        ``d_a × d_a`` (input side), ``G*`` are ``d_g × d_g`` (output side).
      eigvals: KPSVD: eigenvalues of the undamped ``R, S`` at the last refresh (clamped at 0;
        the damping is applied at every step), roles ``("A1", "G1")``; rank two: the
        generalised eigenvalues ``s1`` (input side) and ``s2`` (output side) of the second
        term against the first term damped with the ``λ`` of the last refresh, roles
        ``("A", "G")``. Shapes ``{"d{d}": (n_d, d)}``.
      eigvecs: KPSVD: eigenvectors of ``R, S``; rank two: the diagonalising ``K1`` (input side)
        and ``K2`` (output side), which depend on that ``λ`` too. Shapes
        ``{"d{d}": (n_d, d, d)}``.
      solver_iterations: ``(n_layers, rank)`` int32, iterations of the SVD solver at each
        layer's last statistics update (power: per term; Lanczos: restarted passes).
      solver_residual: ``(n_layers, rank)``, the solver's final relative residual.
    """

    stat_updates: jax.Array
    factors: dict[str, jax.Array]
    eigvals: dict[str, jax.Array]
    eigvecs: dict[str, jax.Array]
    solver_iterations: jax.Array
    solver_residual: jax.Array


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
    """The hyperparameters of one member of the family.

    Attributes:
      kind: one of :data:`KINDS`; it sets the rank (1 for KPSVD, 2 for the others) and the
        solver.
      damping: ``λ``, as the member's ``damping`` argument.
      ema: the factors' EMA decay bound, as ``ema``.
      pi_adjusted: as ``pi_adjusted``.
      tol: the SVD solvers' relative tolerance, as ``tol``.
      max_iters: their iteration cap, as ``max_iters``.
      krylov_dim: Lanczos's steps per pass; ``None`` for the other members.
      indefinite: the rule for an indefinite second term, as ``indefinite``.
    """

    kind: str
    damping: Any
    ema: Any
    pi_adjusted: bool
    tol: Any
    max_iters: int
    krylov_dim: int | None
    indefinite: str

    @property
    def rank(self) -> int:
        """The number of Kronecker terms (1 for KPSVD, 2 for the others)."""
        return 1 if self.kind == "kpsvd" else 2

    @property
    def roles(self) -> tuple[str, ...]:
        """The factor roles stacked per layer, ``("A1", "G1")`` and at rank 2 also ``"A2", "G2"``."""
        return ("A1", "G1") if self.rank == 1 else ("A1", "G1", "A2", "G2")


def layer_samples(layer: layerwise.Layer, stats: Any, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``(ā, g)`` of shapes ``(m, d_a)``, ``(m, d_g)`` whose ``mean (āāᵀ) ⊗ (ggᵀ)`` is the layer's F.

    Dense: ``m = N``. Convolution: ``m = N·T`` and ``g`` scaled by ``√T`` (module docstring).
    """
    a = layerwise.homogeneous_inputs(stats.inputs, layer.has_bias, dtype)
    g = jnp.asarray(stats.output_grads).astype(dtype)
    if a.ndim == 3:
        t = a.shape[1]
        a = a.reshape(-1, a.shape[-1])
        g = g.reshape(-1, g.shape[-1]) * jnp.sqrt(jnp.asarray(t, dtype))
    return a, g


def make_method(cfg: FamilyConfig) -> layerwise.LayerwiseMethod:
    rank = cfg.rank

    def layout4(param_layout):
        return layerwise.FactorLayout.build(param_layout.layers, cfg.roles)

    def layout2(param_layout):
        return layerwise.FactorLayout.build(param_layout.layers, ("A", "G"))

    def init(param_layout, dtype):
        n = len(param_layout.layers)
        fl = layout4(param_layout)
        if rank == 1:
            eigvals, eigvecs = fl.vectors(dtype), fl.eyes(dtype)
        else:
            fl2 = layout2(param_layout)
            eigvals, eigvecs = fl2.vectors(dtype), fl2.eyes(dtype)
        return KroneckerSvdCurvature(
            stat_updates=jnp.zeros((n,), jnp.int32),
            factors=fl.zeros(dtype),
            eigvals=eigvals,
            eigvecs=eigvecs,
            solver_iterations=jnp.zeros((n, rank), jnp.int32),
            solver_residual=jnp.zeros((n, rank), dtype),
        )

    def fresh_factors(old, a, g, rho):
        """Fresh minibatch factors ``{role: value}`` (before averaging) and the solver info."""
        if cfg.kind == "kfac_corrected":
            # KFAC's factors are averaged first; the correction fits F_batch − A ⊗ G with the
            # averaged A, G (as the authors' code does), warm-started from the old S.
            A = rho * old["A1"] + (1 - rho) * (a.T @ a / a.shape[0])
            G = rho * old["G1"] + (1 - rho) * (g.T @ g / g.shape[0])
            pairs, info = linalg.nearest_kronecker(
                a,
                g,
                1,
                "power",
                cfg.tol,
                cfg.max_iters,
                init=[old["G2"]],
                subtract=(A, G),
                return_info=True,
            )
            ((R, S),) = pairs
            return {"A2": R, "G2": S}, {"A1": A, "G1": G}, info
        method = "lanczos" if cfg.kind == "lanczos" else "power"
        inits = [old[f"G{k + 1}"] for k in range(rank)]
        pairs, info = linalg.nearest_kronecker(
            a,
            g,
            rank,
            method,
            cfg.tol,
            cfg.max_iters,
            init=inits,
            krylov_dim=cfg.krylov_dim,
            return_info=True,
        )
        fresh = {}
        for k, (R, S) in enumerate(pairs):
            fresh[f"A{k + 1}"], fresh[f"G{k + 1}"] = R, S
        return fresh, {}, info

    def update_statistics(curv: KroneckerSvdCurvature, param_layout, stats, **extra):
        del extra
        fl = layout4(param_layout)
        values = {}
        k = curv.stat_updates
        iters, resid = curv.solver_iterations, curv.solver_residual
        for i, st in stats.items():
            layer = param_layout.layers[i]
            old = {role: fl.get(curv.factors, i, role) for role in cfg.roles}
            dtype = old["A1"].dtype
            rho = layerwise.ema_decay(k[i] + 1, cfg.ema, dtype)
            a, g = layer_samples(layer, st, dtype)
            fresh, averaged, info = fresh_factors(old, a, g, rho)
            for role, value in fresh.items():
                values[(i, role)] = rho * old[role] + (1 - rho) * value
            for role, value in averaged.items():
                values[(i, role)] = value
            n_info = info["iterations"].shape[0]
            iters = iters.at[i, :n_info].set(info["iterations"])
            resid = resid.at[i, :n_info].set(info["residual"].astype(resid.dtype))
        active = jnp.asarray(sorted(stats), jnp.int32)
        return curv._replace(
            stat_updates=k.at[active].set(optax.safe_increment(k[active])),
            factors=fl.set(curv.factors, values),
            solver_iterations=iters,
            solver_residual=resid,
        )

    def refresh(curv: KroneckerSvdCurvature, param_layout, **extra):
        del extra
        fl = layout4(param_layout)
        if rank == 1:
            eig = fl.map(jnp.linalg.eigh, curv.factors)
            return curv._replace(
                eigvals={key: jnp.maximum(w, 0.0) for key, (w, _) in eig.items()},
                eigvecs={key: v for key, (_, v) in eig.items()},
            )
        fl2 = layout2(param_layout)
        layers = param_layout.layers
        traces = fl.traces(curv.factors)

        def shift(i, role):
            s_a, s_g = linalg.factored_damping(
                fl.get(traces, i, "A1"),
                layers[i].d_a,
                fl.get(traces, i, "G1"),
                layers[i].d_g,
                cfg.damping,
                cfg.pi_adjusted,
            )
            return s_a if role == "A" else s_g

        first = fl2.per_factor(lambda i, role: fl.get(curv.factors, i, role + "1"))
        second = fl2.per_factor(lambda i, role: fl.get(curv.factors, i, role + "2"))
        shifts = fl2.per_factor(shift)
        out = fl2.map(linalg.generalized_eigh, first, second, shifts)
        return curv._replace(
            eigvecs={key: K for key, (K, _) in out.items()},
            eigvals={key: s for key, (_, s) in out.items()},
        )

    def precondition(curv: KroneckerSvdCurvature, param_layout, grads, **extra):
        del extra
        out = {}
        if rank == 1:
            fl = layout4(param_layout)
            for i, v in grads.items():
                a = (fl.get(curv.eigvals, i, "A1"), fl.get(curv.eigvecs, i, "A1"))
                g = (fl.get(curv.eigvals, i, "G1"), fl.get(curv.eigvecs, i, "G1"))
                out[i] = linalg.damped_kron_solve_eigh(a, g, v, cfg.damping, cfg.pi_adjusted)
            return out, curv
        fl2 = layout2(param_layout)
        for i, v in grads.items():
            out[i] = linalg.kron_sum_apply(
                fl2.get(curv.eigvecs, i, "A"),
                fl2.get(curv.eigvals, i, "A"),
                fl2.get(curv.eigvecs, i, "G"),
                fl2.get(curv.eigvals, i, "G"),
                v,
                cfg.indefinite,
            )
        return out, curv

    return layerwise.LayerwiseMethod(init, update_statistics, refresh, precondition)


def _validate(name: str, cfg: FamilyConfig) -> None:
    hp.check_choice(name, "kind", cfg.kind, KINDS)
    hp.check_decay(name, "ema", cfg.ema)
    hp.check_damping(name, cfg.damping)
    if isinstance(cfg.tol, (int, float)) and not cfg.tol >= 0:
        raise ValueError(f"{name}: tol must be >= 0, got {cfg.tol!r}")
    # max_iters may be an array (optax.inject_hyperparams); krylov_dim must stay a Python int
    # (it sets the unrolled Krylov steps): list it in inject_hyperparams' static_args.
    hp.check_positive_int(name, "max_iters", cfg.max_iters)
    if cfg.krylov_dim is not None:
        hp.check_positive_int(name, "krylov_dim", cfg.krylov_dim, static=True)
        if cfg.krylov_dim < cfg.rank:
            raise ValueError(f"{name}: krylov_dim must be >= {cfg.rank}, got {cfg.krylov_dim!r}")
    hp.check_choice(name, "indefinite", cfg.indefinite, linalg.INDEFINITE_MODES)


def transformation(
    name: str,
    state_cls: Any,
    cfg: FamilyConfig,
    stats_period: Any,
    inverse_period: Any,
    fallback: optax.GradientTransformation | None,
    *,
    kernel_output_axes: Mapping[str, int] | None = None,
    max_factor_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The ``scale_by_*`` transformation of one family member, on KFAC's skeleton."""
    _validate(name, cfg)
    return layerwise.layerwise_transformation(
        name=name,
        method=make_method(cfg),
        state_cls=state_cls,
        stats_period=stats_period,
        inverse_period=inverse_period,
        fallback=fallback,
        kernel_output_axes=kernel_output_axes,
        max_factor_dim=max_factor_dim,
    )
