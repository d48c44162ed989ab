"""Damped solves: Sherman–Morrison and damped Kronecker-factored solves.

Nothing here knows about optax or Flax. Every function works on a single block
and is meant to be ``jax.vmap``-ed by its caller over stacks of blocks of the
same shape. All functions are jittable and differentiable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "sherman_morrison_solve",
    "DAMPING_FLOOR",
    "PI_RANGE",
    "factored_damping",
    "damped_kron_solve",
    "damped_kron_solve_eigh",
    "damped_inverse",
]

from sofim_optax.hyperparameters import accumulation_dtype


def sherman_morrison_solve(u: jax.Array, rho: jax.Array | float, v: jax.Array) -> jax.Array:
    r"""Solve ``(rho I + u uᵀ) x = v`` for one rank-one-plus-ridge system.

    Sherman–Morrison gives ``x = v/rho − u (uᵀv) / (rho (rho + uᵀu))``, but that
    textbook form subtracts two nearly equal terms when ``uᵀu >> rho`` and loses
    most of its digits in float32. We split ``v`` into its component along
    ``u`` and the rest instead:

    .. math::

        v = \alpha u + w,\quad \alpha = \frac{u^\top v}{u^\top u},\quad w \perp u,
        \qquad x = \frac{\alpha}{\rho + u^\top u}\, u + \frac{w}{\rho}.

    Both terms are computed without cancellation; in particular ``v = u`` gives
    exactly ``u / (rho + uᵀu)`` (``alpha`` is then exactly 1 and ``w`` exactly 0).
    For ``u = 0`` the result is ``v / rho``.

    Args:
      u: the rank-one direction, shape ``(d,)``.
      rho: the ridge ``rho > 0`` (a scalar).
      v: the right-hand side, shape ``(d,)``.

    Returns:
      ``x`` of shape ``(d,)`` in the result dtype of ``u`` and ``v``. Inner
      products are accumulated in at least float32.
    """
    u = jnp.asarray(u)
    v = jnp.asarray(v)
    if u.ndim != 1 or v.shape != u.shape:
        raise ValueError(
            f"sherman_morrison_solve expects vectors of equal shape (d,), got u {u.shape} and v {v.shape}"
        )
    out_dtype = jnp.result_type(u, v)
    acc = accumulation_dtype(out_dtype)
    u32, v32 = u.astype(acc), v.astype(acc)
    rho = jnp.asarray(rho, acc)
    uu = jnp.vdot(u32, u32)
    uv = jnp.vdot(u32, v32)
    safe_uu = jnp.where(uu > 0, uu, 1.0)
    alpha = jnp.where(uu > 0, uv / safe_uu, 0.0)
    w = v32 - alpha * u32
    x = (alpha / (rho + uu)) * u32 + w / rho
    return x.astype(out_dtype)


# --------------------------------------------------------------------------------------
# Damped Kronecker-factored solves (KFAC and the rest of the Kronecker family).
# --------------------------------------------------------------------------------------

#: Smallest damping ``λ`` the Kronecker solves use: ``λ ← max(λ, DAMPING_FLOOR)``. With it,
#: every eigen-based solve divides by at least ``λ`` (see :func:`damped_kron_solve_eigh`), so
#: ``damping=0`` cannot produce ``inf``/``NaN``.
DAMPING_FLOOR = 1e-12

#: Range that the π of factored Tikhonov damping is clipped to. With ``λ ≥ DAMPING_FLOOR``
#: both factor shifts ``π√λ`` and ``√λ/π`` stay ``≥ 1e-14``, well inside float32's range.
PI_RANGE = (1e-8, 1e8)


def _acc_dtype(*arrays) -> jnp.dtype:
    """Accumulation dtype: the result dtype of ``arrays``, promoted to at least float32."""
    return accumulation_dtype(*arrays)


def factored_damping(
    trace_a: jax.Array | float,
    dim_a: int,
    trace_g: jax.Array | float,
    dim_g: int,
    damping: jax.Array | float,
    pi_adjusted: bool = True,
) -> tuple[jax.Array, jax.Array]:
    r"""Split a damping ``λ`` between two Kronecker factors (factored Tikhonov damping).

    KFAC approximates ``F + λI`` by ``(A + π√λ I) ⊗ (G + (√λ/π) I)`` (Martens & Grosse 2015,
    §6.3). The product of the two shifts is ``λ`` whatever ``π``; ``π`` balances them
    according to the factors' average eigenvalues,

    .. math::

        \pi = \sqrt{\frac{\operatorname{tr}(A)/\dim A}{\operatorname{tr}(G)/\dim G}},

    the choice of Martens & Grosse that keeps the cross terms ``π√λ (I ⊗ G) + (√λ/π)(A ⊗ I)``,
    which the factorisation adds on top of ``A ⊗ G + λI``, small (it equalises the two terms'
    average eigenvalues).

    Guards (documented floors, never a NaN):

    * ``λ`` is floored at :data:`DAMPING_FLOOR` (``1e-12``);
    * when either average trace is not a positive finite number (an all-zero factor, a
      factor not yet filled with statistics), ``π = 1``;
    * ``π`` is clipped to :data:`PI_RANGE` (``[1e-8, 1e8]``).

    Args:
      trace_a: ``tr(A)`` (a scalar).
      dim_a: ``dim A``.
      trace_g: ``tr(G)`` (a scalar).
      dim_g: ``dim G``.
      damping: ``λ ≥ 0``, on the scale of the Fisher ``A ⊗ G``.
      pi_adjusted: use the π above; ``False`` gives ``π = 1`` (``A + √λI`` and ``G + √λI``).

    Returns:
      ``(shift_a, shift_g) = (π√λ, √λ/π)``, scalars in at least float32.
    """
    dtype = _acc_dtype(trace_a, trace_g, damping)
    lam = jnp.maximum(jnp.asarray(damping, dtype), DAMPING_FLOOR)
    sqrt_lam = jnp.sqrt(lam)
    if not pi_adjusted:
        return sqrt_lam, sqrt_lam
    mean_a = jnp.asarray(trace_a, dtype) / dim_a
    mean_g = jnp.asarray(trace_g, dtype) / dim_g
    ok = (mean_a > 0) & (mean_g > 0) & jnp.isfinite(mean_a) & jnp.isfinite(mean_g)
    ratio = jnp.where(ok, mean_a, 1.0) / jnp.where(ok, mean_g, 1.0)
    pi = jnp.where(ok, jnp.sqrt(ratio), 1.0)
    # Clip in the float domain: a ratio overflowing to inf is clipped too.
    pi = jnp.clip(jnp.nan_to_num(pi, nan=1.0), PI_RANGE[0], PI_RANGE[1])
    return pi * sqrt_lam, sqrt_lam / pi


def damped_kron_solve_eigh(
    a_eigh: tuple[jax.Array, jax.Array],
    g_eigh: tuple[jax.Array, jax.Array],
    V: jax.Array,
    damping: jax.Array | float,
    pi_adjusted: bool = True,
) -> jax.Array:
    r"""``A_d⁻¹ V G_d⁻¹`` from eigendecompositions of the undamped factors.

    With ``A = Q_A diag(d_A) Q_Aᵀ`` and ``G = Q_G diag(d_G) Q_Gᵀ``,

    .. math::

        A_d^{-1} V G_d^{-1} = Q_A \Big[(Q_A^\top V Q_G) \oslash
            \big((d_A + \pi\sqrt\lambda)(d_G + \sqrt\lambda/\pi)^\top\big)\Big] Q_G^\top ,

    with the shifts of :func:`factored_damping` (``π`` from ``tr A = Σ d_A`` and
    ``tr G = Σ d_G``). Because the damping enters only here, it may change between two
    eigendecompositions at no cost. Eigenvalues are clamped at 0 first (round-off can make a
    PSD factor's smallest eigenvalues slightly negative), so every divisor is at least
    ``π√λ · √λ/π = λ ≥`` :data:`DAMPING_FLOOR`: the result is always finite for finite inputs.

    Args:
      a_eigh: ``(d_A, Q_A)`` as returned by ``jnp.linalg.eigh(A)``, shapes ``(m,)``, ``(m, m)``.
      g_eigh: ``(d_G, Q_G)``, shapes ``(n,)``, ``(n, n)``.
      V: the right-hand side, shape ``(m, n)``.
      damping: ``λ``.
      pi_adjusted: see :func:`factored_damping`.

    Returns:
      The solution, shape ``(m, n)``, in ``V``'s dtype (computed in at least float32).
    """
    d_a, q_a = a_eigh
    d_g, q_g = g_eigh
    V = jnp.asarray(V)
    if V.ndim != 2 or V.shape != (q_a.shape[-1], q_g.shape[-1]):
        raise ValueError(
            f"damped_kron_solve_eigh: V must have shape (dim A, dim G) = ({q_a.shape[-1]}, "
            f"{q_g.shape[-1]}), got {V.shape}"
        )
    dtype = _acc_dtype(d_a, q_a, d_g, q_g, V)
    d_a = jnp.maximum(d_a.astype(dtype), 0.0)
    d_g = jnp.maximum(d_g.astype(dtype), 0.0)
    q_a, q_g = q_a.astype(dtype), q_g.astype(dtype)
    shift_a, shift_g = factored_damping(
        jnp.sum(d_a), d_a.shape[0], jnp.sum(d_g), d_g.shape[0], damping, pi_adjusted
    )
    rotated = q_a.T @ V.astype(dtype) @ q_g
    scaled = rotated / ((d_a + shift_a)[:, None] * (d_g + shift_g)[None, :])
    return (q_a @ scaled @ q_g.T).astype(V.dtype)


def damped_kron_solve(
    A: jax.Array,
    G: jax.Array,
    V: jax.Array,
    damping: jax.Array | float,
    pi_adjusted: bool = True,
) -> jax.Array:
    r"""Solve one damped Kronecker-factored system: ``A_d⁻¹ V G_d⁻¹``.

    For a layer whose gradient matrix ``V`` has shape ``(dim A, dim G)`` (the kernel
    reshaped to ``(-1, d_out)``, then the bias row), KFAC approximates the Fisher block by
    ``A ⊗ G`` in the **row-major** ``vec`` convention used throughout ``sofim_optax``:

    .. math::

        (A \otimes G)\,\mathrm{vec}_r(X) = \mathrm{vec}_r(A X G^\top),
        \qquad \mathrm{vec}_r(X) = X\text{.reshape}(-1).

    The damped system ``(A_d ⊗ G_d) vec_r(X) = vec_r(V)`` therefore has the solution

    .. math::

        X = A_d^{-1} V G_d^{-1},\qquad A_d = A + \pi\sqrt\lambda\, I,\quad
        G_d = G + \frac{\sqrt\lambda}{\pi} I,

    with ``π = sqrt((tr A/dim A)/(tr G/dim G))``, or ``π = 1`` when ``pi_adjusted=False``
    (Martens & Grosse 2015, §6.3; guards and floors in :func:`factored_damping`).

    ``A`` and ``G`` must be symmetric positive semi-definite (they are second moments). The
    solve goes through their eigendecompositions (:func:`damped_kron_solve_eigh`), which is
    never NaN for finite inputs. One block; ``jax.vmap`` it over stacks of equal shapes.

    Args:
      A: the input-side factor, shape ``(m, m)``.
      G: the output-side factor, shape ``(n, n)``.
      V: the right-hand side, shape ``(m, n)``.
      damping: ``λ``, on the scale of ``A ⊗ G``.
      pi_adjusted: see above.

    Returns:
      ``X`` of shape ``(m, n)`` in ``V``'s dtype (computed in at least float32).
    """
    A, G = jnp.asarray(A), jnp.asarray(G)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"damped_kron_solve: A and G must be square, got {A.shape} and {G.shape}")
    dtype = _acc_dtype(A, G)
    return damped_kron_solve_eigh(
        jnp.linalg.eigh(A.astype(dtype)), jnp.linalg.eigh(G.astype(dtype)), V, damping, pi_adjusted
    )


def damped_inverse(F: jax.Array, shift: jax.Array | float, method: str = "cholesky") -> jax.Array:
    r"""Explicit inverse ``(F + shift·I)⁻¹`` of one symmetric PSD block.

    Args:
      F: symmetric positive semi-definite, shape ``(m, m)``.
      shift: ``> 0``.
      method: ``"cholesky"`` (``F + shift I = L Lᵀ``, then two triangular solves against
        ``I``), ``"inv"`` (LU-based ``jnp.linalg.inv``) or ``"eigh"`` (``Q diag(1/(max(d,0) +
        shift)) Qᵀ``, never NaN for finite input and ``shift > 0``). ``"cholesky"`` returns NaN
        when round-off makes ``F + shift I`` indefinite (a shift below about ``1e-7‖F‖`` in
        float32); callers that need a guarantee check ``isfinite`` and fall back to ``"eigh"``.

    Returns:
      The symmetrised inverse, shape ``(m, m)``, in at least float32.
    """
    F = jnp.asarray(F)
    dtype = _acc_dtype(F)
    F = F.astype(dtype)
    shift = jnp.asarray(shift, dtype)
    eye = jnp.eye(F.shape[-1], dtype=dtype)
    if method == "eigh":
        d, q = jnp.linalg.eigh(F)
        inv = (q / (jnp.maximum(d, 0.0) + shift)[None, :]) @ q.T
    elif method == "cholesky":
        chol = jnp.linalg.cholesky(F + shift * eye)
        inv = jax.scipy.linalg.cho_solve((chol, True), eye)
    elif method == "inv":
        inv = jnp.linalg.inv(F + shift * eye)
    else:
        raise ValueError(
            f'damped_inverse: method must be "cholesky", "inv" or "eigh", got {method!r}'
        )
    return 0.5 * (inv + inv.T)
