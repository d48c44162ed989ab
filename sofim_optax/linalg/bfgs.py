"""BFGS and L-BFGS building blocks on one block (K-BFGS, Goldfarb, Ren & Bahamou 2020).

* :func:`bfgs_inverse_update`: the BFGS update of an inverse-Hessian approximation.
* :func:`double_damping`: Powell damping on ``H`` then Powell damping with ``B = I`` (the
  authors' "double damping"), which makes any pair usable by BFGS with a curvature bounded
  below.
* :func:`lbfgs_inverse_matvec`: ``H v`` for the L-BFGS matrix of a memory of pairs held
  in chronological rows with a validity mask (a fixed-size ring buffer handed over oldest
  first), by the compact representation (default) or the two-loop recursion.

All functions are pure, jittable and work on one block; callers ``vmap`` them if needed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["bfgs_inverse_update", "double_damping", "lbfgs_inverse_matvec"]


def bfgs_inverse_update(H: jax.Array, s: jax.Array, y: jax.Array) -> jax.Array:
    r"""The BFGS update of an inverse-Hessian approximation ``H`` with the pair ``(s, y)``.

    .. math::

        H^+ = (I - \rho\, s y^\top)\, H\, (I - \rho\, y s^\top) + \rho\, s s^\top,
        \qquad \rho = 1 / (s^\top y),

    computed in ``O(d²)`` as ``H + (ρ² yᵀHy + ρ) s sᵀ − ρ (s (Hy)ᵀ + (Hy) sᵀ)`` (the form of
    the authors' ``get_BFGS_formula``); symmetric up to round-off when ``H`` is (XLA may
    fuse the terms differently on the two sides of the diagonal). ``H⁺`` satisfies the secant
    equation ``H⁺ y = s``, and is symmetric positive definite when ``H`` is and ``sᵀy > 0``.

    No safeguard here: the caller decides when to skip (``sᵀy ≤ 0`` gives a meaningless
    result). ``H`` is assumed symmetric.

    Args:
      H: ``(d, d)`` symmetric matrix.
      s: ``(d,)`` step.
      y: ``(d,)`` gradient change.

    Returns:
      ``(d, d)`` updated matrix, in the dtype of ``H`` (promoted with ``s``, ``y``).
    """
    Hy = H @ y
    rho = 1.0 / jnp.dot(s, y)
    coef = rho * rho * jnp.dot(y, Hy) + rho
    return H + coef * jnp.outer(s, s) - rho * (jnp.outer(s, Hy) + jnp.outer(Hy, s))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def double_damping(
    s: jax.Array, y: jax.Array, Hy: jax.Array, mu1: Any = 0.2, mu2: Any = 1.0
) -> tuple[jax.Array, jax.Array]:
    r"""K-BFGS's double damping of a pair ``(s, y)`` (authors' code, ``kron_bfgs_update_damping``).

    1. Powell damping on ``H`` (``Hy = H y`` of the current inverse approximation): if
       ``sᵀy ≤ μ₁ yᵀHy``,

       .. math:: \theta_1 = \frac{(1-\mu_1)\, y^\top H y}{y^\top H y - s^\top y},\qquad
                 s \leftarrow \theta_1 s + (1 - \theta_1) H y,

       after which ``sᵀy = μ₁ yᵀHy``. Unchanged when ``sᵀy > μ₁ yᵀHy``.
    2. Powell damping with ``B = I`` (the Levenberg–Marquardt-like step): if
       ``sᵀy ≤ μ₂ sᵀs``,

       .. math:: \theta_2 = \frac{(1-\mu_2)\, s^\top s}{s^\top s - s^\top y},\qquad
                 y \leftarrow \theta_2 y + (1 - \theta_2) s,

       after which ``sᵀy = μ₂ sᵀs``. Unchanged when ``sᵀy > μ₂ sᵀs``.

    With ``μ₂ > 1`` and ``sᵀy < sᵀs``, ``θ₂ < 0`` (an extrapolation, as in the authors'
    code). So the result always has ``sᵀy ≥ μ₂ sᵀs`` (bounding the curvature of ``H⁻¹`` along
    ``s`` from below, an upper bound on ``H``) whenever ``s ≠ 0``. The authors' code uses
    this convex-combination form for step 2 (the third-party ASDL code instead always adds
    ``μ₂ s`` to ``y``, and flips the sign in step 1; we follow the authors).

    Degenerate inputs, where the authors' code would divide by zero, are made safe:
    ``yᵀHy = 0`` (e.g. ``y = 0``) skips step 1; ``sᵀs = 0`` skips step 2; and
    ``sᵀs = sᵀy`` with ``μ₂ ≥ 1`` (so ``θ₂`` is unbounded) uses
    ``y ← y + (μ₂ − sᵀy/sᵀs) s`` instead, which gives the same ``sᵀy = μ₂ sᵀs``.

    Args:
      s, y: ``(d,)`` the pair.
      Hy: ``(d,)`` ``H y`` with the current inverse approximation ``H``.
      mu1: ``μ₁`` of step 1 (the authors use ``0.2``).
      mu2: ``μ₂`` of step 2 (the authors use ``√λ``, ``λ`` the damping).

    Returns:
      The damped ``(s, y)``.
    """
    sy = jnp.dot(s, y)
    yHy = jnp.dot(y, Hy)
    # Step 1: Powell on H.
    damp1 = (yHy > 0) & (sy <= mu1 * yHy)
    theta1 = jnp.where(damp1, _safe_div((1.0 - mu1) * yHy, yHy - sy), 1.0)
    s = theta1 * s + (1.0 - theta1) * Hy
    # Step 2: Powell with B = I.
    ss = jnp.dot(s, s)
    sy = jnp.dot(s, y)
    damp2 = (ss > 0) & (sy <= mu2 * ss)
    den = ss - sy
    regular = jnp.abs(den) > 1e-6 * ss
    theta2 = jnp.where(damp2 & regular, _safe_div((1.0 - mu2) * ss, den), 1.0)
    y_convex = theta2 * y + (1.0 - theta2) * s
    y_shift = y + (mu2 - _safe_div(sy, ss)) * s
    y = jnp.where(damp2 & ~regular, y_shift, y_convex)
    return s, y


def _compact_matvec(S, Y, mask, v, gamma):
    """Byrd–Nocedal–Schnabel compact form of the L-BFGS inverse, invalid rows neutralised."""
    m = S.shape[0]
    maskf = mask.astype(S.dtype)
    S = S * maskf[:, None]
    Y = Y * maskf[:, None]
    SY = S @ Y.T  # (m, m), SY[i, j] = s_iᵀ y_j
    eye = jnp.eye(m, dtype=S.dtype)
    # R: upper triangle of SᵀY; an invalid pair gets a unit diagonal and no couplings, so it
    # drops out (its s and y are zero).
    R = jnp.triu(SY) * (maskf[:, None] * maskf[None, :]) + eye * (1.0 - maskf)[:, None]
    D = jnp.diagonal(SY) * maskf
    YY = Y @ Y.T
    Sv = S @ v  # (m, k)
    Yv = Y @ v
    q = jax.scipy.linalg.solve_triangular(R, Sv, lower=False)  # R⁻¹ Sᵀv
    rhs = D[:, None] * q + gamma * (YY @ q) - gamma * Yv
    w = jax.scipy.linalg.solve_triangular(R, rhs, trans="T", lower=False)  # R⁻ᵀ(...)
    return gamma * v + S.T @ w - gamma * (Y.T @ q)


def _two_loop_matvec(S, Y, mask, v, gamma):
    """The classical two-loop recursion (Nocedal 1980) over the valid rows, as two scans."""
    sy = jnp.sum(S * Y, axis=1)
    rho = jnp.where(mask, 1.0 / jnp.where(mask, sy, 1.0), 0.0)

    def backward(q, i):  # newest to oldest
        alpha = rho[i] * (S[i] @ q)
        return q - alpha[None] * Y[i][:, None], alpha

    m = S.shape[0]
    q, alphas = lax.scan(backward, v, jnp.arange(m - 1, -1, -1))
    alphas = alphas[::-1]

    def forward(r, i):  # oldest to newest
        beta = rho[i] * (Y[i] @ r)
        return r + (alphas[i] - beta)[None] * S[i][:, None], None

    r, _ = lax.scan(forward, gamma * q, jnp.arange(m))
    return r


def lbfgs_inverse_matvec(
    S: jax.Array,
    Y: jax.Array,
    mask: jax.Array,
    v: jax.Array,
    gamma: Any = 1.0,
    method: str = "compact",
) -> jax.Array:
    r"""``H v`` for the L-BFGS inverse-Hessian approximation of a memory of pairs.

    ``H`` is what :func:`bfgs_inverse_update` gives when started from ``H₀ = γ I`` and applied
    to the valid pairs ``(S[i], Y[i])`` in row order (rows are chronological, **oldest
    first**; ``mask[i]`` says whether row ``i`` holds a pair, invalid rows are ignored
    whatever they contain). A transformation that keeps its memory in a fixed-size ring
    buffer rolls it so that the oldest pair comes first before calling this.

    ``method="compact"`` (default) uses the compact representation of Byrd, Nocedal &
    Schnabel (1994), as the K-BFGS authors' code does:

    .. math::

        H v = \gamma v + S^\top w - \gamma Y^\top q,\quad
        q = R^{-1} S v,\quad
        w = R^{-\top}\big((D + \gamma Y Y^\top) q - \gamma Y v\big),

    with ``R`` the upper triangle of ``S Yᵀ`` (``R_ij = s_iᵀy_j``, ``i ≤ j``) and
    ``D = diag(s_iᵀy_i)``: a handful of matrix products and two ``m × m`` triangular solves,
    efficient when ``v`` has many columns. ``method="two_loop"`` runs the two-loop recursion
    (Nocedal 1980) as two ``lax.scan`` over the ``m`` rows. The two are equal in exact
    arithmetic.

    Every valid pair must have ``s_iᵀy_i > 0`` (the caller's acceptance rule).

    Args:
      S, Y: ``(m, d)`` pairs, one per row, oldest first.
      mask: ``(m,)`` bool, valid rows.
      v: ``(d,)`` or ``(d, k)`` (each column multiplied).
      gamma: ``γ`` of ``H₀ = γ I`` (K-BFGS(L) uses ``γ = 1``).
      method: ``"compact"`` or ``"two_loop"``.

    Returns:
      ``H v``, shaped like ``v``.
    """
    if method not in ("compact", "two_loop"):
        raise ValueError(
            f"lbfgs_inverse_matvec: method must be 'compact' or 'two_loop', got {method!r}"
        )
    if S.ndim != 2 or Y.shape != S.shape or mask.shape != S.shape[:1]:
        raise ValueError(
            f"lbfgs_inverse_matvec: expected S, Y of shape (m, d) and mask (m,), got S {S.shape}, "
            f"Y {Y.shape}, mask {mask.shape}"
        )
    if v.shape[0] != S.shape[1] or v.ndim not in (1, 2):
        raise ValueError(
            f"lbfgs_inverse_matvec: v must be (d,) or (d, k) with d = {S.shape[1]}, got {v.shape}"
        )
    vec = v.ndim == 1
    vm = v[:, None] if vec else v
    dtype = jnp.result_type(S, Y, v)
    S, Y, vm = S.astype(dtype), Y.astype(dtype), vm.astype(dtype)
    gamma = jnp.asarray(gamma).astype(dtype)
    mask = jnp.asarray(mask).astype(bool)
    fn = _compact_matvec if method == "compact" else _two_loop_matvec
    out = fn(S, Y, mask, vm, gamma)
    return out[:, 0] if vec else out
