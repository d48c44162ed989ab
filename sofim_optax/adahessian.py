"""AdaHessian (Yao et al. 2021) as optax transformations.

AdaHessian is Adam with the squared gradient replaced by the square of a
Hutchinson estimate of the Hessian diagonal, spatially averaged over
convolution kernels. The Hessian-vector products it needs come from the loss
function, which ``update`` takes as the keyword-only extra argument
``obj_fn`` (the name optax's Sophia uses): ``obj_fn(params) -> scalar``, the
loss on the current minibatch. The random probes come from a PRNG key kept in
the state, seeded by ``seed``, so no key has to be passed to ``update``.

Reference: Zhewei Yao, Amir Gholami, Sheng Shen, Mustafa Mustafa, Kurt
Keutzer, Michael W. Mahoney, "ADAHESSIAN: An Adaptive Second Order Optimizer
for Machine Learning", AAAI 2021, https://arxiv.org/abs/2006.00719, and its
authors' PyTorch code (``amirgholami/adahessian``), whose choices we follow
where the paper leaves something open (written down at each place below).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sofim_optax import aliases, distributed, guards
from sofim_optax import hyperparameters as hp
from sofim_optax.hyperparameters import Scalar

__all__ = [
    "ScaleByAdaHessianState",
    "scale_by_adahessian",
    "adahessian",
    "hutchinson_hessian_diagonal",
]


class ScaleByAdaHessianState(NamedTuple):
    """State of :func:`scale_by_adahessian`. Every leaf is an array.

    Attributes:
      count: ``()`` int32, number of updates so far.
      hessian_count: ``()`` int32, number of Hessian-diagonal estimates folded
        into ``nu`` so far (the bias correction of ``nu`` uses it).
      key: ``(2,)`` uint32, the raw PRNG key the Rademacher probes are drawn
        from; split at every Hessian refresh.
      mu: first moment of the gradients, shaped like the parameters, in
        ``mu_dtype`` (at least float32 by default).
      nu: second moment of the (spatially averaged) Hessian-diagonal
        estimates, shaped like the parameters, at least float32.
      skipped: :class:`sofim_optax.guards.SkipCounts`, how many steps, statistics updates
        and refreshes were skipped because they were non-finite (the state kept its last good
        values).
    """

    count: jax.Array  # shape=(), dtype=int32
    hessian_count: jax.Array  # shape=(), dtype=int32
    key: jax.Array  # shape=(2,), dtype=uint32
    mu: optax.Updates
    nu: optax.Updates
    skipped: guards.SkipCounts


def _require_obj_fn(obj_fn: Any, params: Any, who: str) -> None:
    if obj_fn is None:
        raise TypeError(
            f"{who}.update needs the keyword argument obj_fn=, a function params -> scalar loss on "
            "the current minibatch (e.g. obj_fn=lambda p: loss_fn(p, x, y)); it is used for "
            "Hessian-vector products."
        )
    if not callable(obj_fn):
        raise TypeError(f"{who}: obj_fn must be callable, got {type(obj_fn).__name__}")
    if params is None:
        raise ValueError(
            f"{who}.update needs params (the point at which the Hessian is estimated)."
        )


def hutchinson_hessian_diagonal(
    obj_fn: Callable[[optax.Params], jax.Array],
    params: optax.Params,
    key: jax.Array,
    num_probes: int = 1,
) -> optax.Updates:
    r"""Hutchinson estimate of the Hessian diagonal, averaged over ``num_probes`` probes.

    .. math::

        D = \frac{1}{S}\sum_{s=1}^{S} z_s \odot (H z_s),\qquad
        z_s \sim \text{Rademacher},\quad \mathbb{E}[D] = \operatorname{diag}(H),

    with :math:`H = \nabla^2` ``obj_fn(params)`` and each :math:`Hz` a
    forward-over-reverse Hessian-vector product (the probes run in one
    ``vmap``). The variance of one entry is :math:`\sum_{j\ne i} H_{ij}^2 / S`.

    Args:
      obj_fn: ``params -> scalar``.
      params: the point at which the Hessian is taken (any pytree of arrays).
      key: a PRNG key (raw ``uint32[2]`` or typed).
      num_probes: :math:`S`, a Python int ``>= 1``.

    Returns:
      A pytree shaped like ``params`` with leaves in the parameter dtype
      promoted to at least float32.
    """
    hp.check_positive_int("hutchinson_hessian_diagonal", "num_probes", num_probes, static=True)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))

    def probes(k: jax.Array, p: jax.Array) -> jax.Array:
        # Rademacher ±1, exactly representable in every float dtype.
        return jax.random.rademacher(k, (num_probes, *jnp.shape(p)), dtype=jnp.asarray(p).dtype)

    z = jax.tree.unflatten(treedef, [probes(k, p) for k, p in zip(keys, leaves)])
    grad_fn = jax.grad(obj_fn)

    def one(zi: optax.Params) -> optax.Updates:
        hz = jax.jvp(grad_fn, (params,), (zi,))[1]
        return jax.tree.map(
            lambda a, b: (
                a.astype(hp.accumulation_dtype(a.dtype)) * b.astype(hp.accumulation_dtype(a.dtype))
            ),
            zi,
            hz,
        )

    products = distributed.map_directions(one, z)
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), products)


def _block_average(d: jax.Array, block_size: int) -> jax.Array:
    """Replaces each run of ``block_size`` consecutive entries (row-major) by its mean."""
    flat = d.reshape(-1)
    size = flat.shape[0]
    num_blocks = -(-size // block_size)
    pad = num_blocks * block_size - size
    sums = jnp.pad(flat, (0, pad)).reshape(num_blocks, block_size).sum(axis=1)
    counts = jnp.full((num_blocks,), block_size, d.dtype).at[-1].set(block_size - pad)
    return jnp.repeat(sums / counts, block_size)[:size].reshape(d.shape)


def _spatial_average(
    d: jax.Array, spatial_averaging: bool, block_size: int, average_absolute: bool
) -> jax.Array:
    if average_absolute:
        d = jnp.abs(d)
    if spatial_averaging and d.ndim >= 3:
        # Flax/Haiku convolution kernels are (*spatial, c_in, c_out): average over the
        # spatial axes, one value per (c_in, c_out) pair, as the paper does per kernel.
        axes = tuple(range(d.ndim - 2))
        return jnp.broadcast_to(jnp.mean(d, axis=axes, keepdims=True), d.shape)
    if block_size > 1 and d.size > 1:
        return _block_average(d, block_size)
    return d


def _check_hyperparameters(b1: Any, b2: Any, eps: Any, hessian_power: Any) -> None:
    # Concrete Python numbers only: inject_hyperparams passes traced arrays.
    for name, value in (("b1", b1), ("b2", b2)):
        if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
            raise ValueError(f"scale_by_adahessian: {name} must lie in [0, 1), got {value}")
    if isinstance(eps, (int, float)) and not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"scale_by_adahessian: eps must be a finite number > 0, got {eps}")
    if isinstance(hessian_power, (int, float)) and not 0.0 <= hessian_power <= 1.0:
        raise ValueError(
            f"scale_by_adahessian: hessian_power must lie in [0, 1], got {hessian_power}"
        )


@hp.structural("num_probes", "block_size")
def scale_by_adahessian(
    *,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-4,
    hessian_power: Scalar = 1.0,
    num_probes: int = 1,
    stats_period: int | jax.Array = 1,
    spatial_averaging: bool = True,
    block_size: int = 1,
    average_absolute: bool = True,
    seed: int = 0,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Scales updates by AdaHessian's Hessian-diagonal second moment.

    With gradient :math:`g_t` at step :math:`t = 1, 2, \dots` and, at every
    ``stats_period``-th step (the first included), a Hutchinson estimate
    :math:`D` of the Hessian diagonal of ``obj_fn`` at the current parameters
    (see :func:`hutchinson_hessian_diagonal`), made the :math:`j`-th time:

    .. math::

        D^{(s)} &= \operatorname{avg}(|D|)
            \quad\text{(spatial or block average, see below)},\\
        v_j &= \beta_2 v_{j-1} + (1-\beta_2)\, D^{(s)} \odot D^{(s)},\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\, g_t,\\
        u_t &= \frac{m_t / (1-\beta_1^t)}
                    {\big(\sqrt{v_j / (1-\beta_2^j)}\big)^{k} + \epsilon},

    where :math:`j` is the number of Hessian estimates so far and :math:`k`
    the Hessian power. Returns :math:`u_t` (no learning rate and no sign:
    chain with ``optax.scale_by_learning_rate`` or use :func:`adahessian`).

    ``update`` needs the keyword-only extra argument ``obj_fn``
    (``params -> scalar`` loss on the current minibatch) and ``params``:
    ``updates, state = tx.update(grads, state, params, obj_fn=lambda p: loss(p, batch))``.
    Each refresh costs ``num_probes`` Hessian-vector products (about two
    gradient evaluations each); they run under ``lax.cond`` so steps without a
    refresh cost nothing extra. The probes come from the key in the state.

    Spatial averaging (paper §3.3): the Hessian diagonal of a convolution
    kernel varies a lot within a kernel, so the estimate is averaged over each
    kernel's spatial positions. Leaves with ``ndim >= 3`` are taken as Flax /
    Haiku kernels ``(*spatial, c_in, c_out)`` and averaged over the leading
    ``ndim - 2`` axes (PyTorch's ``(c_out, c_in, kh, kw)`` layout averages
    over the trailing two; same result for a Flax model). Other leaves are
    averaged over runs of ``block_size`` consecutive entries (the paper's
    general block average; ``1``, the default and the authors' code, means no
    averaging).

    Departures and choices, each documented:

    * ``average_absolute=True`` (default) averages :math:`|D|`, as the
      authors' code does (``hv.abs()`` before the mean). The paper averages
      the signed :math:`D`; ``average_absolute=False`` does that. They differ
      only where averaging mixes signs.
    * ``stats_period > 1`` (not in the paper; the ``update_each`` option of
      the widely used ``ada-hessian`` PyTorch package): the second moment is
      updated only when a new estimate is made, and its bias correction counts
      estimates (:math:`j`), not steps, so a stale estimate is never counted
      twice. With ``stats_period=1`` this is exactly the paper.
    * ``num_probes`` averages several probes per estimate (the paper uses 1).
    * Moments are kept in at least float32; the update comes back in each
      gradient leaf's dtype.

    Args:
      b1: first-moment decay :math:`\beta_1` (default 0.9, the paper's).
      b2: second-moment decay :math:`\beta_2` (default 0.999, the paper's).
      eps: :math:`\epsilon` added to the denominator (default ``1e-4``, the
        authors' code default).
      hessian_power: :math:`k \in [0, 1]` (default 1, used for the paper's
        vision experiments; ``0.5`` in some of its NLP ones). ``k = 0`` gives
        bias-corrected momentum scaled by :math:`1/(1+\epsilon)`.
      num_probes: Rademacher probes per estimate (Python int; default 1).
        Under ``optax.inject_hyperparams`` list it in ``static_args`` (see
        ``scale_by_adahessian.static_args``).
      stats_period: make a new Hessian estimate every this many steps
        (default 1). May be an array (``inject_hyperparams``).
      spatial_averaging: average convolution kernels over their spatial axes
        (default ``True``).
      block_size: block length for averaging leaves that are not spatially
        averaged (Python int; default 1: no averaging; a static argument like
        ``num_probes``).
      average_absolute: average :math:`|D|` (code) instead of :math:`D`
        (paper); default ``True``.
      seed: seed of the PRNG key kept in the state (default 0).
      mu_dtype: dtype of the first moment (default ``None``: the gradient's dtype
        promoted to at least float32).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
      Learning <https://arxiv.org/abs/2006.00719>`_, AAAI 2021.
    """
    who = "scale_by_adahessian"
    hp.check_positive_int(who, "num_probes", num_probes, static=True)
    hp.check_positive_int(who, "block_size", block_size, static=True)
    hp.check_positive_int(who, "stats_period", stats_period)
    _check_hyperparameters(b1, b2, eps, hessian_power)

    def init_fn(params: optax.Params) -> ScaleByAdaHessianState:
        def zeros(p: jax.Array, dtype: Any = None) -> jax.Array:
            return jnp.zeros(jnp.shape(p), dtype or hp.accumulation_dtype(jnp.asarray(p).dtype))

        return ScaleByAdaHessianState(
            count=jnp.zeros([], jnp.int32),
            hessian_count=jnp.zeros([], jnp.int32),
            key=jax.random.PRNGKey(seed),
            mu=jax.tree.map(lambda p: zeros(p, mu_dtype), params),
            nu=jax.tree.map(zeros, params),
            skipped=guards.no_skips(),
        )

    def update_fn(
        updates: optax.Updates,
        state: ScaleByAdaHessianState,
        params: optax.Params | None = None,
        *,
        obj_fn: Callable[[optax.Params], jax.Array] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByAdaHessianState]:
        del extra_args
        _require_obj_fn(obj_fn, params, who)

        def refresh(operand):
            key, nu, hessian_count, skipped = operand
            key, sub = jax.random.split(key)
            diag = hutchinson_hessian_diagonal(obj_fn, params, sub, num_probes)

            def fold(v: jax.Array, d: jax.Array) -> jax.Array:
                ds = _spatial_average(
                    d.astype(v.dtype), spatial_averaging, block_size, average_absolute
                )
                beta = jnp.asarray(b2, v.dtype)
                return beta * v + (1 - beta) * ds * ds

            # A non-finite probe (e.g. a NaN in obj_fn's value) leaves nu as it was; the key
            # still advances, so the next refresh draws fresh probes.
            (new_nu, new_count), skipped = guards.guarded(
                (jax.tree.map(fold, nu, diag), optax.safe_increment(hessian_count)),
                (nu, hessian_count),
                skipped,
                "statistics",
            )
            return key, new_nu, new_count, skipped

        def keep(operand):
            return operand

        period = jnp.asarray(stats_period, jnp.int32)
        key, nu, hessian_count, skipped = jax.lax.cond(
            state.count % period == 0,
            refresh,
            keep,
            (state.key, state.nu, state.hessian_count, state.skipped),
        )
        count = optax.safe_increment(state.count)

        def moment(g: jax.Array, m: jax.Array) -> jax.Array:
            beta1 = jnp.asarray(b1, m.dtype)
            return beta1 * m + (1 - beta1) * g.astype(m.dtype)

        def direction(g: jax.Array, m: jax.Array, v: jax.Array) -> jax.Array:
            dtype = jnp.promote_types(m.dtype, v.dtype)
            mhat = m.astype(dtype) / (1 - jnp.asarray(b1, dtype) ** count.astype(dtype))
            vhat = v.astype(dtype) / (1 - jnp.asarray(b2, dtype) ** hessian_count.astype(dtype))
            denom = jnp.sqrt(vhat) ** jnp.asarray(hessian_power, dtype) + jnp.asarray(eps, dtype)
            return (mhat / denom).astype(g.dtype)

        mu = jax.tree.map(moment, updates, state.mu)
        new_updates = jax.tree.map(direction, updates, mu, nu)
        return new_updates, ScaleByAdaHessianState(
            count=count, hessian_count=hessian_count, key=key, mu=mu, nu=nu, skipped=skipped
        )

    return optax.GradientTransformationExtraArgs(
        init_fn, distributed.mesh_agnostic(guards.skip_nonfinite_steps(update_fn))
    )


_ADAHESSIAN_DOC = r"""The AdaHessian optimiser with decoupled weight decay.

    .. math::

        \theta_t = \theta_{t-1} - \eta_t\,(u_t + \lambda\,\theta_{t-1}),

    with :math:`u_t` from :func:`scale_by_adahessian`. Weight decay is
    decoupled (AdamW style), as in the authors' code
    (``p - lr * (m̂/denom + weight_decay * p)``) and the AdamW-style variant
    the paper describes; it never enters the moments or the Hessian estimate.
    That is ``optax.chain(scale_by_adahessian(...),
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate))``.

    Usage (``obj_fn`` is the loss on the current minibatch)::

        opt = sofim_optax.adahessian(0.15, weight_decay=5e-4)
        state = opt.init(params)

        @jax.jit
        def train_step(params, state, x, y):
            obj_fn = lambda p: loss_fn(p, x, y)
            loss, grads = jax.value_and_grad(obj_fn)(params)
            updates, state = opt.update(grads, state, params, obj_fn=obj_fn)
            return optax.apply_updates(params, updates), state, loss

    Args:
      learning_rate: :math:`\eta`, a float or an optax schedule. Default 0.15,
        the authors' setting for ResNets on CIFAR-10 (with ``weight_decay``
        5e-4 and a step schedule there).
      weight_decay: :math:`\lambda` (default 0).
      weight_decay_mask: which parameters weight decay applies to, as for
        ``optax.add_decayed_weights`` (default ``None``: all).

    {scale_by_arguments}

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires
      ``params`` and ``obj_fn=``.

    References:
      Yao et al., `ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
      Learning <https://arxiv.org/abs/2006.00719>`_, AAAI 2021.
    """

adahessian = aliases.make_alias(
    scale_by_adahessian,
    aliases.decay_chain,
    name="adahessian",
    doc=_ADAHESSIAN_DOC,
    alias_arguments=aliases.DECAY_ARGUMENTS,
    learning_rate_default=0.15,
)
