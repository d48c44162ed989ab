"""optax conformance of every public optimizer, in one suite (in the manner of optax's
``common_test``).

Every alias and every ``scale_by_*`` of ``sofim_optax`` (plus
``sofim_optax.diagonal_fisher.scale_by_diagonal_fisher``) is listed in ``REGISTRY`` with the
hyperparameters it runs with here (small periods, so that three steps include a refresh) and
the extra ``update`` arguments it needs (``layer_stats``, ``previous_batch_stats``,
``obj_fn``). All of them are fed from one tiny ``flax.linen`` model (a 2×2 convolution and a
dense layer, both with a bias) along a short trajectory of three minibatches. For each
optimizer the suite checks:

* every argument after ``learning_rate`` is keyword-only (for every factory found in
  ``sofim_optax.__all__``, so that a new factory cannot escape the suite);
* ``jax.jit`` of ``init``/``update`` equals eager execution (and the step calls no host
  function: no Python callback, infeed, outfeed, send or recv), extra arguments the method does
  not use are ignored, and the second and third steps do not retrace;
* ``chain(scale_by_*, scale(-lr))`` equals the alias, the alias's documented composition
  (momentum, weight decay) equals the explicit optax chain, and, where the direction is
  linear in the gradient, ``chain(scale(2), scale_by_*, scale(-1/2))`` is minus ``scale_by_*``;
* ``optax.inject_hyperparams(f, static_args=f.static_args)`` under ``jit`` equals ``f``; a
  changed learning rate (aliases) and a changed damping take effect (this and the checks
  below run once per method, on its alias, which contains its ``scale_by_*``);
* ``optax.MultiSteps(every_k_schedule=2)`` forwards the extra arguments and updates only
  every second step, with the mean gradient;
* ``optax.apply_if_finite``: a NaN/±inf gradient leaves the parameters and the state unchanged;
* a learning-rate schedule (``optax.linear_schedule``) scales the direction step by step;
* checkpointing: after two steps the state round-trips bit-identically through
  ``orbax.checkpoint.StandardCheckpointer`` and ``flax.serialization``, and the next step
  from the restored state equals the next step from the original, bit for bit;
* float32, bfloat16 and float64 (under ``jax.enable_x64``) parameters: updates come back in
  the parameter dtype and are finite over three steps including a refresh, the state is
  arrays only, finite, with a structure, shapes and dtypes that do not change across steps,
  plus per-method state invariants (``Case.check_state``).

Method-specific semantics and the maths against dense references live in the per-method
test files.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sofim_optax
from sofim_optax.adahessian import ScaleByAdaHessianState
from sofim_optax.diagonal_fisher import DiagonalFisherState, scale_by_diagonal_fisher
from sofim_optax.kbfgs import ScaleByKbfgsState
from sofim_optax.kfac import ScaleByKfacState
from sofim_optax.kpsvd import ScaleByKpsvdState
from sofim_optax.mini_block_fisher import ScaleByMiniBlockFisherState
from sofim_optax.nystrom_sgd import ScaleByNystromSgdState
from sofim_optax.sofim import ScaleBySofimState

nn = pytest.importorskip("flax.linen")
linen_capture = pytest.importorskip("sofim_optax.curvature.linen")
from sofim_optax.curvature import losses  # noqa: E402
from sofim_optax.quadratic_model import QuadraticModelState  # noqa: E402

LR = 0.1
STEPS = 3
N_EXAMPLES = 6
N_CLASSES = 3


# ----------------------------------------------------------------------------------------
# The tiny model and its three minibatches.
# ----------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Conv 2×2 (1 -> 2 channels, bias) on 3×3 images, a LayerNorm (not captured: the
    methods' fallbacks), then Dense (8 -> 3, bias): 41 weights."""

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(nn.relu(nn.Conv(2, (2, 2), padding="VALID")(x)))
        return nn.Dense(N_CLASSES)(x.reshape(x.shape[0], -1))


MODEL = TinyNet()
N_PARAMS = 2 * 2 * 1 * 2 + 2 + 2 + 2 + 8 * N_CLASSES + N_CLASSES


def loss_fn(variables, x, y):
    # (the library's helper: the mean cross-entropy, registering the predictions that the
    # adaptive methods' Gauss-Newton products need)
    return losses.softmax_cross_entropy(MODEL.apply(variables, x), y)


def _batches():
    rng = np.random.default_rng(0)
    return [
        (
            rng.standard_normal((N_EXAMPLES, 3, 3, 1)).astype(np.float32),
            np.arange(N_EXAMPLES) % N_CLASSES,
        )
        for _ in range(STEPS)
    ]


@functools.lru_cache(maxsize=None)
def trajectory_f32():
    """Parameters, gradients and extra inputs of three steps along a plain-SGD trajectory.

    Step ``t`` sees the parameters ``θ_t`` (``θ_{t+1} = θ_t - 0.3 ∇``), the gradient and the
    statistics of minibatch ``t`` at ``θ_t``, and the statistics of minibatch ``t - 1`` at
    ``θ_t`` (K-BFGS's ``previous_batch_stats``; at step 0 those of minibatch 2, which K-BFGS
    ignores: it has no previous minibatch yet). Computed once, in one compiled program.
    """
    batches = [tuple(jnp.asarray(a) for a in b) for b in _batches()]

    @jax.jit
    def run(batches):
        variables = MODEL.init(jax.random.key(0), batches[0][0])
        out = []
        for t in range(STEPS):
            _, grads, stats = linen_capture.value_grad_and_stats(loss_fn, variables, *batches[t])
            _, _, prev = linen_capture.value_grad_and_stats(loss_fn, variables, *batches[t - 1])
            out.append(
                (
                    variables,
                    grads,
                    {"layer_stats": stats, "previous_batch_stats": prev, "batch": batches[t]},
                )
            )
            variables = jax.tree.map(lambda p, g: p - 0.3 * g, variables, grads)
        return out

    return jax.device_get(run(batches))


def trajectory(dtype=jnp.float32):
    """``trajectory_f32`` cast to ``dtype`` (floating arrays only), made on the host."""

    def cast(x):
        x = np.asarray(x)
        return jnp.asarray(x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x)

    return [jax.tree.map(cast, step) for step in trajectory_f32()]


# ----------------------------------------------------------------------------------------
# The registry: what each optimizer runs with and what it needs.
# ----------------------------------------------------------------------------------------


def _find(state, cls):
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
        if isinstance(s, cls)
    ]
    assert found, f"no {cls.__name__} in the state"
    return found[0]


def _kfac_state(state, steps):
    inner = _find(state, ScaleByKfacState)
    assert inner.count.dtype == jnp.int32 and int(inner.count) == steps
    assert all(f.dtype == jnp.float32 for f in inner.curvature.factors.values())


def _kpsvd_state(state, steps):
    inner = _find(state, ScaleByKpsvdState)
    assert inner.count.dtype == jnp.int32 and int(inner.count) == steps
    assert all(f.dtype == jnp.float32 for f in inner.curvature.factors.values())
    assert int(np.asarray(inner.curvature.solver_iterations)[:, 0].min()) >= 1


def _mbf_state(state, steps):
    inner = _find(state, ScaleByMiniBlockFisherState)
    assert inner.count.dtype == jnp.int32 and int(inner.count) == steps
    assert all(f.dtype == jnp.float32 for f in inner.curvature.blocks.values())
    assert all(f.dtype == jnp.float32 for f in inner.curvature.inverses.values())


def _kbfgs_state(state, steps):
    inner = _find(state, ScaleByKbfgsState)
    assert inner.count.dtype == jnp.int32 and int(inner.count) == steps
    assert all(
        a.dtype == jnp.float32 for a in jax.tree.leaves((inner.curvature.A, inner.curvature.Ha))
    )
    assert int(inner.curvature.hg_updates.sum()) > 0  # the trajectory gives real (s, y) pairs


def _sofim_state(state, steps):
    inner = _find(state, ScaleBySofimState)
    assert int(inner.count) == steps
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(inner.mu))


def _adahessian_state(state, steps):
    inner = _find(state, ScaleByAdaHessianState)
    assert inner.count.dtype == jnp.int32 and int(inner.count) == steps
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((inner.mu, inner.nu)))


def _nystrom_state(state, steps):
    inner = _find(state, ScaleByNystromSgdState)
    assert inner.count.dtype == jnp.int32 and int(inner.count) == steps
    assert inner.eigvecs.dtype == jnp.float32 and inner.eigvecs.shape == (N_PARAMS, 3)


def _diagonal_fisher_state(state, steps):
    inner = _find(state, DiagonalFisherState)
    assert int(inner.count) == steps


@dataclasses.dataclass(frozen=True)
class Case:
    """One public optimizer.

    Attributes:
      factory: the public factory.
      kwargs: hyperparameters after ``learning_rate`` (small periods: a refresh within 3 steps).
      needs: the extra ``update`` arguments it needs.
      check_state: per-method invariants of the state after some steps (float32/bfloat16).
      scale_by: aliases only: the ``scale_by_*`` factory the alias is built on.
      plain: aliases only: the alias arguments that reduce it to
        ``chain(scale_by(**kwargs), scale_by_learning_rate(lr))`` (momentum off).
      composed: aliases only: ``(alias arguments, explicit chain of the parts after scale_by,
        as a function of the scale_by_* transformation)`` for its documented composition.
      linear: scale_by_* only: the first step's direction is linear in the gradient.
      damping_shrinks: a much larger damping gives a much smaller step.
      dtype_kwargs: extra hyperparameters of the dtype runs (an optax fallback for the
        uncovered LayerNorm, where the method takes one).
      adaptive: an adaptive alias (no learning rate; the quadratic model around a method) or
        ``scale_by_quadratic_model`` itself.
      direction: ``scale_by_quadratic_model`` only: the direction it wraps (its positional
        argument).
      explicit: adaptive aliases only: the same optimizer built by hand from
        ``scale_by_quadratic_model`` and the method's ``scale_by_*``.
    """

    factory: Callable[..., optax.GradientTransformationExtraArgs]
    kwargs: dict[str, Any]
    needs: tuple[str, ...]
    check_state: Callable[[Any, int], None]
    scale_by: Callable[..., optax.GradientTransformationExtraArgs] | None = None
    plain: dict[str, Any] = dataclasses.field(default_factory=dict)
    composed: tuple[dict[str, Any], Callable[[Any], tuple]] | None = None
    linear: bool = False
    damping_shrinks: bool = False
    dtype_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    adaptive: bool = False
    direction: Any = None
    explicit: Callable[[], optax.GradientTransformation] | None = None

    @property
    def is_alias(self) -> bool:
        return self.scale_by is not None

    def make(self, learning_rate=LR, **overrides):
        kwargs = {**self.kwargs, **overrides}
        if self.is_alias:
            return self.factory(learning_rate, **kwargs)
        if self.direction is not None:
            return self.factory(self.direction, **kwargs)
        return self.factory(**kwargs)

    @property
    def static_args(self) -> tuple[str, ...]:
        return tuple(getattr(self.factory, "static_args", ()))


STATS = ("layer_stats",)
TWO_PASS = ("layer_stats", "previous_batch_stats")
OBJ = ("obj_fn",)


def _momentum_after(momentum):
    """The composition of KFAC, the KPSVD family and Nyström-SGD: decay, then momentum."""
    kwargs = {"momentum": momentum, "weight_decay": 1e-2}
    return kwargs, lambda inner: (inner, optax.add_decayed_weights(1e-2), optax.trace(momentum))


def _gradient_ema_first(inner):
    """K-BFGS: decay and an EMA of the gradients before the preconditioner."""
    return (optax.add_decayed_weights(1e-2), optax.ema(0.5, debias=False), inner)


def _decay_after(inner):
    return (inner, optax.add_decayed_weights(1e-2))


def _scale_cases():
    so = sofim_optax
    kf = {"damping": 1e-2, "inverse_period": 2}
    kp = {"damping": 1e-2, "stats_period": 1, "inverse_period": 2, "max_iters": 20}
    mb = {"damping": 1e-2, "stats_period": 1, "inverse_period": 2, "dense_block_size": 3}
    kb = {"damping": 0.1}
    ah = {"stats_period": 2, "num_probes": 2}
    ny = {"rank": 3, "stats_period": 2, "damping": 0.1}
    sf = {"damping": 0.5, "scope": "mini_block", "block_size": 4}
    return {
        # name: (scale_by factory, kwargs, needs, state check, linear, damping shrinks)
        "sofim": (so.scale_by_sofim, sf, (), _sofim_state, False, True),
        "kfac": (so.scale_by_kfac, kf, STATS, _kfac_state, True, True),
        "mini_block_fisher": (so.scale_by_mini_block_fisher, mb, STATS, _mbf_state, True, True),
        "kpsvd": (so.scale_by_kpsvd, kp, STATS, _kpsvd_state, True, False),
        "kpsvd_deflation": (so.scale_by_kpsvd_deflation, kp, STATS, _kpsvd_state, True, False),
        "kfac_corrected": (so.scale_by_kfac_corrected, kp, STATS, _kpsvd_state, True, False),
        "kpsvd_lanczos": (so.scale_by_kpsvd_lanczos, kp, STATS, _kpsvd_state, True, False),
        "kbfgs": (so.scale_by_kbfgs, kb, TWO_PASS, _kbfgs_state, True, False),
        "adahessian": (so.scale_by_adahessian, ah, OBJ, _adahessian_state, True, False),
        "nystrom_sgd": (so.scale_by_nystrom_sgd, ny, OBJ, _nystrom_state, True, False),
    }


def _dtype_kwargs(factory):
    """An optax fallback where the factory takes one (MBF's default is its diagonal Fisher)."""
    parameter = inspect.signature(factory).parameters.get("fallback")
    if parameter is None or parameter.default is not None:
        return {}
    return {"fallback": optax.scale_by_rms()}


def _build_registry() -> dict[str, Case]:
    so = sofim_optax
    scales = _scale_cases()
    registry = {}
    for name, (make, kwargs, needs, check, linear, shrinks) in scales.items():
        registry[f"scale_by_{name}"] = Case(
            make,
            kwargs,
            needs,
            check,
            linear=linear,
            damping_shrinks=shrinks,
            dtype_kwargs=_dtype_kwargs(make),
        )
    registry["scale_by_diagonal_fisher"] = Case(
        scale_by_diagonal_fisher,
        {"stats_period": 2},
        (),
        _diagonal_fisher_state,
        damping_shrinks=True,
    )
    aliases = {
        # alias name: (factory, scale_by name, extra kwargs, plain, composed)
        "sofim": (so.sofim, "sofim", {}, {}, ({"weight_decay": 1e-2}, _decay_after)),
        "kfac": (so.kfac, "kfac", {}, {"momentum": None}, _momentum_after(0.5)),
        "mini_block_fisher": (
            so.mini_block_fisher,
            "mini_block_fisher",
            {},
            {"gradient_momentum": None},
            # (with gradient momentum: tests/test_mini_block_fisher.py)
            ({"gradient_momentum": None, "weight_decay": 1e-2}, _decay_after),
        ),
        "kpsvd": (so.kpsvd, "kpsvd", {}, {"momentum": None}, _momentum_after(0.5)),
        "kpsvd_deflation": (
            so.kpsvd_deflation,
            "kpsvd_deflation",
            {},
            {"momentum": None},
            _momentum_after(0.5),
        ),
        "kfac_corrected": (
            so.kfac_corrected,
            "kfac_corrected",
            {},
            {"momentum": None},
            _momentum_after(0.5),
        ),
        "kpsvd_lanczos": (
            so.kpsvd_lanczos,
            "kpsvd_lanczos",
            {},
            {"momentum": None},
            _momentum_after(0.5),
        ),
        "kbfgs": (
            so.kbfgs,
            "kbfgs",
            {},
            {"gradient_ema": None},
            ({"gradient_ema": 0.5, "weight_decay": 1e-2}, _gradient_ema_first),
        ),
        # K-BFGS(L) is K-BFGS with a memory.
        "kbfgs_l": (
            so.kbfgs_l,
            "kbfgs",
            {"memory": 2},
            {"gradient_ema": None},
            ({"gradient_ema": 0.5, "weight_decay": 1e-2}, _gradient_ema_first),
        ),
        "adahessian": (so.adahessian, "adahessian", {}, {}, ({"weight_decay": 1e-2}, _decay_after)),
        "nystrom_sgd": (so.nystrom_sgd, "nystrom_sgd", {}, {}, _momentum_after(0.5)),
    }
    for name, (factory, base, extra, plain, composed) in aliases.items():
        make, kwargs, needs, check, _, shrinks = scales[base]
        registry[name] = Case(
            factory,
            {**kwargs, **extra},
            needs,
            check,
            scale_by=make,
            plain=plain,
            composed=composed,
            damping_shrinks=shrinks,
            dtype_kwargs=_dtype_kwargs(factory),
        )
    registry.update(_adaptive_cases(scales))
    # A wrapper: KFAC with its state partitioned (one device here: flat buffers, unsplit).
    make, kwargs, needs, _, linear, _ = scales["kfac"]
    registry["partition_state"] = Case(
        so.partition_state,
        {"min_size": 4},
        needs,
        _partitioned(),
        direction=make(**kwargs),
        linear=linear,
    )
    return registry


def _partitioned():
    """The state check of KFAC partitioned: flat finite buffers holding at least the factors,
    and KFAC's own count in the unpacked rest."""

    def check_state(state, steps):
        part = _find(state, sofim_optax.PartitionedState)
        assert all(b.ndim == 1 and bool(jnp.all(jnp.isfinite(b))) for b in part.buffers.values())
        inner = _find(part.rest, ScaleByKfacState)
        assert inner.count.dtype == jnp.int32 and int(inner.count) == steps
        assert all(f is None for f in inner.curvature.factors.values())  # packed
        assert sum(b.size for b in part.buffers.values()) >= 4 * 4 + 9 * 9 + 3 * 3

    return check_state


def _quadratic_model_state(check=None):
    def check_state(state, steps):
        qm = _find(state, QuadraticModelState)
        assert int(qm.count) == steps and int(qm.rejected) == 0
        assert float(qm.damping) > 0 and float(qm.learning_rate) != 0
        if check is not None:
            check(state, steps)

    return check_state


# The adaptive aliases: (scale_by name of the registry, damping fed back). Their λ adapts at
# steps 0 and 2 of the three (damping_period=2).
ADAPTIVE_BASES = {
    "kfac_adaptive": ("kfac", True),
    "kpsvd_adaptive": ("kpsvd", True),
    "kpsvd_deflation_adaptive": ("kpsvd_deflation", True),
    "kfac_corrected_adaptive": ("kfac_corrected", True),
    "kpsvd_lanczos_adaptive": ("kpsvd_lanczos", True),
    "mbf_adaptive": ("mini_block_fisher", True),
    "kbfgs_adaptive": ("kbfgs", True),
    "kbfgs_l_adaptive": ("kbfgs", True),
    "sofim_adaptive": ("sofim", False),
    "adahessian_adaptive": ("adahessian", False),
}


def _adaptive_cases(scales):
    so = sofim_optax
    model = {"damping_period": 2}
    cases = {
        "scale_by_quadratic_model": Case(
            so.scale_by_quadratic_model,
            model,
            OBJ,
            _quadratic_model_state(),
            adaptive=True,
            direction=optax.scale_by_adam(),
        )
    }
    for name, (base, fed) in ADAPTIVE_BASES.items():
        make, kwargs, needs, check, _, _ = scales[base]
        method = {k: v for k, v in kwargs.items() if not (fed and k == "damping")}
        if name == "kbfgs_l_adaptive":
            method["memory"] = 2
        if name == "mbf_adaptive":
            method["inverse"] = "eigh"  # (the alias's own default)
        if fed:

            def explicit(make=make, method=method):
                return so.scale_by_quadratic_model(
                    lambda damping: make(damping=damping, **method), **model
                )
        else:

            def explicit(make=make, method=method):
                return so.scale_by_quadratic_model(make(**method), **model)

        cases[name] = Case(
            getattr(so, name),
            {**model, **method},
            tuple(dict.fromkeys(needs + OBJ)),
            _quadratic_model_state(check),
            adaptive=True,
            explicit=explicit,
            dtype_kwargs=_dtype_kwargs(getattr(so, name)),
        )
    return cases


REGISTRY = _build_registry()
ALIASES = sorted(k for k, c in REGISTRY.items() if c.is_alias)
SCALE_BYS = sorted(k for k, c in REGISTRY.items() if not c.is_alias)
ALL = sorted(REGISTRY)
# The wrappers (inject_hyperparams, MultiSteps, apply_if_finite) and the dtype runs treat any
# transformation alike, so they run once per method: on its alias, which contains the
# scale_by_* (plus the scale_by_* that has no alias). jit, eager, the chain and the signature
# are checked on every factory.
WRAPPED = sorted(
    ALIASES
    + [
        k
        for k in SCALE_BYS
        if not any(REGISTRY[a].scale_by is REGISTRY[k].factory for a in ALIASES)
    ]
)
# The adaptive methods run the whole matrix in the slow suite (`make test-slow`: each test
# compiles a method and the quadratic model, a few seconds each, which `make test`'s budget
# does not hold); the fast suite checks the bare wrapper around Adam (test_chain_equals_alias,
# three jitted steps).
# tests/test_quadratic_model.py checks the step itself, in the fast suite.
FAST_ADAPTIVE: set[str] = set()
FAST_COMPOSITION = {"scale_by_quadratic_model"}
# The rank-two KPSVD members' scale_by_* compile the costliest programs of the composition
# test (about 10 s each); their aliases, whose check runs the same scale_by_* inside the
# documented chain, stay in the fast suite.
SLOW_COMPOSITION = {"scale_by_kpsvd_deflation", "scale_by_kfac_corrected", "scale_by_kpsvd_lanczos"}


def matrix(names, fast=FAST_ADAPTIVE, slow=frozenset()):
    """``names`` as pytest parameters: the adaptive methods outside ``fast``, and those in
    ``slow``, marked slow."""
    return [
        pytest.param(n, marks=pytest.mark.slow)
        if (REGISTRY[n].adaptive and n not in fast) or n in slow
        else n
        for n in names
    ]


# Methods cheap enough to compare every step with eager execution.
EAGER_EVERY_STEP = {"sofim", "scale_by_sofim", "scale_by_diagonal_fisher"}
# Public names that are the same object as a registry entry (not run twice).
SAME_AS = {"mbf": "mini_block_fisher"}


def extra_args(case: Case, inputs: dict[str, Any], everything: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``update`` for ``case`` (all of them with ``everything``)."""
    available = {
        "layer_stats": inputs["layer_stats"],
        "previous_batch_stats": inputs["previous_batch_stats"],
        "obj_fn": functools.partial(lambda batch, p: loss_fn(p, *batch), inputs["batch"]),
    }
    if everything:  # and one the method has never heard of
        return {**available, "unrelated": 3}
    return {k: available[k] for k in case.needs}


def jitted_update(opt, case: Case, everything: bool = False):
    """``opt.update`` under ``jit`` with the extra arguments built inside from arrays; the
    returned function's ``traces`` list grows by one at every trace."""
    traces = []

    @jax.jit
    def update(grads, state, params, inputs):
        traces.append(1)
        return opt.update(grads, state, params, **extra_args(case, inputs, everything))

    update.traces = traces
    return update


def run(opt, case: Case, steps, state=None, update=None, init=None):
    """Steps ``opt`` along the trajectory; returns the updates of each step and the state."""
    update = update or jitted_update(opt, case)
    state = (init or jax.jit(opt.init))(steps[0][0]) if state is None else state
    outs = []
    for params, grads, inputs in steps:
        u, state = update(grads, state, params, inputs)
        outs.append(u)
    return outs, state


@functools.lru_cache(maxsize=None)
def shared(name: str, variant: str):
    """``(opt, jitted update, jitted init)`` of one configuration, compiled once per test
    process and reused by every test that runs it: ``"direction"`` is ``make()`` (the
    ``scale_by_*`` itself, or the alias with its defaults), ``"plain"`` the alias with its
    momentum off (``make(**plain)``)."""
    case = REGISTRY[name]
    opt = case.make() if variant == "direction" else case.make(**case.plain)
    return opt, jitted_update(opt, case), jax.jit(opt.init)


def run_shared(name: str, variant: str, steps, state=None):
    opt, update, init = shared(name, variant)
    return run(opt, REGISTRY[name], steps, state=state, update=update, init=init)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6, err_msg=""):
    assert jax.tree.structure(a) == jax.tree.structure(b), err_msg
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(
            np.asarray(x, np.float64),
            np.asarray(y, np.float64),
            rtol=rtol,
            atol=atol,
            err_msg=err_msg,
        )


def assert_zero(tree, err_msg=""):
    assert all(
        float(np.abs(np.asarray(x, np.float64)).max()) == 0.0 for x in jax.tree.leaves(tree)
    ), err_msg


def assert_finite(tree, err_msg=""):
    assert all(
        np.all(np.isfinite(np.asarray(x, np.float64)))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ), err_msg


def layers(updates):
    """The layers the curvature methods precondition (not the LayerNorm, a fallback)."""
    return {k: updates["params"][k] for k in ("Conv_0", "Dense_0")}


def tree_norm(tree) -> float:
    return float(
        np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    )


# ----------------------------------------------------------------------------------------
# Signatures.
# ----------------------------------------------------------------------------------------


def _public_factories():
    out = {}
    for name in sofim_optax.__all__:
        obj = getattr(sofim_optax, name)
        if inspect.isfunction(obj) and "GradientTransformation" in str(
            inspect.signature(obj).return_annotation
        ):
            out[name] = obj
    return out


def test_every_public_factory_is_in_the_registry_and_keyword_only():
    factories = _public_factories()
    assert len(factories) >= 21  # 11 aliases (with mbf) and 10 scale_by_*
    factories["scale_by_diagonal_fisher"] = scale_by_diagonal_fisher
    assert sofim_optax.mbf is sofim_optax.mini_block_fisher
    for name, factory in factories.items():
        case = REGISTRY[SAME_AS.get(name, name)]
        assert case.factory is factory, name
        if not case.adaptive and case.direction is None:
            assert name.startswith("scale_by_") != case.is_alias, name
        params = list(inspect.signature(factory).parameters.values())
        if case.direction is not None:  # a wrapper: the transformation it wraps comes first
            assert params[0].name in ("direction", "inner"), name
            assert params[0].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD, name
            params = params[1:]
        if case.is_alias:
            assert params[0].name == "learning_rate", name
            assert params[0].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD, name
            params = params[1:]
        assert params, name
        for p in params:
            assert p.kind == inspect.Parameter.KEYWORD_ONLY, f"{name}: {p.name} is not keyword-only"
        # Every static argument names a real argument.
        assert set(case.static_args) <= {p.name for p in params}, name


def test_every_argument_name_is_in_the_documented_table():
    """``docs/arguments.md`` lists every argument name of every public factory, and no other."""
    import pathlib
    import re

    table = pathlib.Path(__file__).resolve().parents[1] / "docs" / "arguments.md"
    documented = set()
    for row in table.read_text().splitlines():
        if row.startswith("| `"):
            documented |= set(re.findall(r"`([a-z_0-9]+)`", row.split("|")[1]))
    factories = {**_public_factories(), "scale_by_diagonal_fisher": scale_by_diagonal_fisher}
    used = {p for f in factories.values() for p in inspect.signature(f).parameters}
    assert used - documented == set(), "arguments missing from docs/arguments.md"
    assert documented - used == set(), "docs/arguments.md names arguments no factory takes"


# ----------------------------------------------------------------------------------------
# jit, chain, inject_hyperparams, MultiSteps, apply_if_finite, schedules.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", matrix(ALL))
def test_jit_equals_eager_no_retrace_and_stable_state(name):
    """Three jitted steps (with every extra argument, used or not) against eager ``init`` and
    ``update`` (with only the needed ones); one trace; updates in float32, finite; the state
    arrays only, finite, with the same structure, shapes and dtypes after a refresh."""
    case = REGISTRY[name]
    steps = trajectory()
    opt = case.make(**case.dtype_kwargs)
    update = jitted_update(opt, case, everything=True)
    state0 = jax.jit(opt.init)(steps[0][0])
    jitted, state = run(opt, case, steps, state=state0, update=update)
    assert len(update.traces) == 1, f"{name}: retraced"

    # Eager execution is op by op: every step for the cheap methods, the first for the others.
    eager_steps = steps if name in EAGER_EVERY_STEP else steps[:1]
    eager_state = opt.init(steps[0][0])
    jax.tree.map(
        lambda a, b: a.dtype == b.dtype or pytest.fail(f"{name}: {a} {b}"), eager_state, state0
    )
    # Every state leaf is its own buffer, so that a jitted step may donate the state.
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(eager_state)]
    assert len(pointers) == len(set(pointers)), f"{name}: state leaves share a buffer"
    for t, (params, grads, inputs) in enumerate(eager_steps):
        eager_u, eager_state = opt.update(grads, eager_state, params, **extra_args(case, inputs))
        assert_trees_close(eager_u, jitted[t], err_msg=f"{name} step {t}")
    params = steps[0][0]

    for u in jitted:
        for a, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
            assert a.dtype == p.dtype == jnp.float32, name
        assert_finite(u, name)
        assert tree_norm(u) > 0, name
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state)), name
    assert jax.tree.structure(state0) == jax.tree.structure(state), name
    jax.tree.map(
        lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(name), state0, state
    )
    assert_finite(state, name)
    case.check_state(state, STEPS)
    # No host round-trip in the step: no Python callback, no infeed/outfeed, no send/recv.
    params, grads, inputs = steps[0]
    program = update.lower(grads, state, params, inputs).as_text()
    calls = r"custom_call @\w*(?:python|callback)\w*|stablehlo\.(?:infeed|outfeed|send|recv)\b"
    host = re.findall(calls, program)
    assert not host, f"{name}: the step calls the host ({sorted(set(host))})"


@pytest.mark.parametrize("name", matrix(ALL, fast=FAST_COMPOSITION, slow=SLOW_COMPOSITION))
def test_chain_equals_alias(name):
    """scale_by_*: ``chain(scale_by(**kw), scale(-lr))`` equals the alias (with the alias's
    momentum off) and, if linear, ``chain(scale(2), scale_by, scale(-1/2))`` is minus
    ``scale_by`` at the first step. Aliases: their documented composition (momentum, weight
    decay) equals the explicit optax chain."""
    case = REGISTRY[name]
    steps = trajectory()
    if case.adaptive:
        # The alias is scale_by_quadratic_model around its method, built by hand; a chain
        # around the wrapper forwards obj_fn and the method's arguments.
        got, _ = run(case.make(), case, steps)
        want, _ = run(case.explicit() if case.explicit else optax.chain(case.make()), case, steps)
        for t, (u, w) in enumerate(zip(got, want)):
            assert_trees_close(u, w, rtol=1e-5, atol=1e-7, err_msg=f"{name} step {t}")
        return
    if case.direction is not None:  # partition_state: the wrapped method's own updates
        got, _ = run(optax.chain(case.make(), optax.scale(-LR)), case, steps)
        want, _ = run(optax.chain(case.direction, optax.scale(-LR)), case, steps)
        for t, (u, w) in enumerate(zip(got, want)):
            assert_trees_close(u, w, rtol=1e-6, atol=1e-8, err_msg=f"{name} step {t}")
        return
    if case.is_alias:
        alias_kwargs, parts = case.composed
        got, _ = run(case.make(**alias_kwargs), case, steps)
        inner = case.scale_by(**case.kwargs)
        want, _ = run(optax.chain(*parts(inner), optax.scale(-LR)), case, steps)
        for t, (u, w) in enumerate(zip(got, want)):
            assert_trees_close(u, w, rtol=1e-5, atol=1e-7, err_msg=f"{name} step {t}")
        return
    direction, _ = run_shared(name, "direction", steps)
    chained, _ = run(optax.chain(case.make(), optax.scale(-LR)), case, steps)
    aliases = [
        REGISTRY[a]
        for a in ALIASES
        if REGISTRY[a].scale_by is case.factory and REGISTRY[a].kwargs == case.kwargs
    ]
    assert aliases or name == "scale_by_diagonal_fisher", name
    for alias in aliases:
        alias_name = next(k for k, v in REGISTRY.items() if v is alias)
        got, _ = run_shared(alias_name, "plain", steps)
        for t, (u, w) in enumerate(zip(got, chained)):
            assert_trees_close(u, w, rtol=1e-5, atol=1e-7, err_msg=f"{name} step {t}")
    for t, (u, d) in enumerate(zip(chained, direction)):
        assert_trees_close(u, jax.tree.map(lambda x: -LR * x, d), err_msg=f"{name} step {t}")
    if case.linear:
        scaled = optax.chain(optax.scale(2.0), case.make(), optax.scale(-0.5))
        (first, *_), _ = run(scaled, case, steps[:1])
        # (on the preconditioned layers: MBF's diagonal fallback is not linear)
        assert_trees_close(
            layers(first), jax.tree.map(lambda x: -x, layers(direction[0])), err_msg=name
        )


@pytest.mark.parametrize("name", matrix(WRAPPED))
def test_inject_hyperparams(name):
    """Injected under jit equals the factory; a doubled learning rate doubles the step of an
    alias; a damping changed at run time equals continuing with a factory of that damping."""
    case = REGISTRY[name]
    steps = trajectory()
    kwargs = {**case.kwargs, **case.plain}
    if case.is_alias:
        kwargs["learning_rate"] = LR
    if case.direction is not None:  # (the wrapper's first argument)
        kwargs[next(iter(inspect.signature(case.factory).parameters))] = case.direction
    injected = optax.inject_hyperparams(case.factory, static_args=case.static_args)(**kwargs)
    update = jitted_update(injected, case)
    state = jax.jit(injected.init)(steps[0][0])
    got = []
    for t, (params, grads, inputs) in enumerate(steps):
        if t == STEPS - 1 and case.is_alias:
            state.hyperparams["learning_rate"] = jnp.asarray(2 * LR, jnp.float32)
        u, state = update(grads, state, params, inputs)
        got.append(u)
    assert len(update.traces) == 1, f"{name}: retraced"
    want, _ = run_shared(name, "plain", steps)
    if case.is_alias:
        want[-1] = jax.tree.map(lambda x: 2 * x, want[-1])
    for t, (u, w) in enumerate(zip(got, want)):
        # float32 round-off, relative to the step's scale: a traced hyperparameter changes
        # XLA's fusions, and the KPSVD family's iterative solvers carry the difference on.
        scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(w))
        assert_trees_close(u, w, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{name} step {t}")

    if "damping" not in inspect.signature(case.factory).parameters:
        return
    # A damping changed before the third step (a refresh with the periods of 2) equals
    # continuing from the same state with a factory built with the new damping, and really
    # changes the step.
    state = jax.jit(injected.init)(steps[0][0])
    for params, grads, inputs in steps[:-1]:
        _, state = update(grads, state, params, inputs)
    damping = 100.0 * float(case.kwargs.get("damping", 1.0))
    state.hyperparams["damping"] = jnp.asarray(damping, state.hyperparams["damping"].dtype)
    params, grads, inputs = steps[-1]
    got, _ = update(grads, state, params, inputs)
    new = case.make(**case.plain, damping=damping)
    want, _ = jitted_update(new, case)(grads, state.inner_state, params, inputs)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
    same, _ = shared(name, "plain")[1](grads, state.inner_state, params, inputs)
    assert not np.allclose(_flat(got), _flat(same)), name
    if case.damping_shrinks:
        assert tree_norm(layers(got)) < 0.2 * tree_norm(layers(same)), name


def _flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("name", matrix(WRAPPED))
def test_multisteps_forwards_extra_args(name):
    case = REGISTRY[name]
    steps = trajectory()
    ms = optax.MultiSteps(case.make(), every_k_schedule=2)
    (u0, u1), _ = run(ms, case, steps[:2])
    assert_zero(u0, name)
    params, _, inputs = steps[1]
    mean = jax.tree.map(lambda a, b: (a + b) / 2, steps[0][1], steps[1][1])
    want, _ = run_shared(name, "direction", [(params, mean, inputs)])
    assert_trees_close(u1, want[0], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("name", matrix(WRAPPED))
def test_apply_if_finite_skips_nonfinite_gradients(name):
    case = REGISTRY[name]
    steps = trajectory()
    opt = optax.apply_if_finite(case.make(), max_consecutive_errors=5)
    update = jitted_update(opt, case)
    state = jax.jit(opt.init)(steps[0][0])
    u, state = update(steps[0][1], state, steps[0][0], steps[0][2])
    params = optax.apply_updates(steps[1][0], u)
    for n_bad, bad in enumerate([np.nan, np.inf, -np.inf], start=1):
        grads = jax.tree.map(lambda x: x, steps[1][1])
        kernel = grads["params"]["Dense_0"]["kernel"]
        grads["params"]["Dense_0"]["kernel"] = kernel.at[0, 0].set(bad)
        u, new_state = update(grads, state, params, steps[1][2])
        assert_zero(u, name)
        new_params = optax.apply_updates(params, u)
        jax.tree.map(np.testing.assert_array_equal, new_params, params)
        jax.tree.map(np.testing.assert_array_equal, new_state.inner_state, state.inner_state)
        assert int(new_state.notfinite_count) == n_bad, name
        state = new_state
    assert len(update.traces) == 1, name


@pytest.mark.parametrize("name", ALIASES)
def test_schedule_learning_rate(name):
    """``alias(schedule)`` (momentum off) is ``-schedule(t)`` times ``scale_by_*`` at step t."""
    case = REGISTRY[name]
    steps = trajectory()
    schedule = optax.linear_schedule(1.0, 0.0, transition_steps=2)
    got, _ = run(case.make(schedule, **case.plain), case, steps)
    scale_name = next(
        (k for k, v in REGISTRY.items() if v.factory is case.scale_by and v.kwargs == case.kwargs),
        None,
    )
    if scale_name is None:  # (K-BFGS(L): K-BFGS with a memory)
        direction, _ = run(case.scale_by(**case.kwargs), case, steps)
    else:
        direction, _ = run_shared(scale_name, "direction", steps)
    for t, (u, d) in enumerate(zip(got, direction)):
        assert_trees_close(
            u, jax.tree.map(lambda x: -schedule(t) * x, d), atol=1e-7, err_msg=f"{name} step {t}"
        )
    assert tree_norm(got[0]) > 0 and tree_norm(got[1]) > 0, name
    assert_zero(got[2], name)


# ----------------------------------------------------------------------------------------
# dtypes.
# ----------------------------------------------------------------------------------------


def _check_dtype_run(name, dtype):
    case = REGISTRY[name]
    steps = trajectory(dtype)
    opt = case.make(**case.dtype_kwargs)
    state0 = jax.jit(opt.init)(steps[0][0])
    updates, state = run(opt, case, steps, state=state0)
    for u in updates:
        for a, p in zip(jax.tree.leaves(u), jax.tree.leaves(steps[0][0])):
            assert a.dtype == p.dtype == dtype, name
        assert_finite(u, name)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state)), name
    assert jax.tree.structure(state0) == jax.tree.structure(state), name
    jax.tree.map(
        lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(name), state0, state
    )
    assert_finite(state, name)
    return case, state


@pytest.mark.parametrize("name", matrix(WRAPPED))
def test_bfloat16_params(name):
    case, state = _check_dtype_run(name, jnp.bfloat16)
    case.check_state(state, STEPS)


@pytest.mark.parametrize("name", matrix(WRAPPED))
def test_float64_params(name, x64):
    _check_dtype_run(name, jnp.float64)


# ----------------------------------------------------------------------------------------
# Checkpointing: orbax and flax serialisation.
# ----------------------------------------------------------------------------------------


def assert_bit_identical(a, b, err_msg=""):
    """Same tree structure, and every leaf with the same shape, dtype and bytes."""
    assert jax.tree.structure(a) == jax.tree.structure(b), err_msg
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.shape, x.dtype) == (y.shape, y.dtype), f"{err_msg}: {x.dtype}{x.shape} {y}"
        assert x.tobytes() == y.tobytes(), err_msg


@pytest.mark.parametrize("name", matrix(WRAPPED))
def test_state_round_trips_through_orbax_and_flax_serialization(name, tmp_path):
    """After two steps the state saved with ``orbax.checkpoint.StandardCheckpointer`` (restored
    into ``jax.eval_shape(opt.init, params)``) and with ``flax.serialization`` (``to_bytes`` /
    ``from_bytes``, and ``msgpack_restore`` / ``from_state_dict``, into ``opt.init(params)``)
    comes back bit-identical, and one more step from it gives a bit-identical update and state.
    Nothing here names a state field, so a new field is covered as it lands."""
    ocp = pytest.importorskip("orbax.checkpoint")
    serialization = pytest.importorskip("flax.serialization")
    case = REGISTRY[name]
    steps = trajectory()
    opt, update, init = shared(name, "direction")
    _, state = run(opt, case, steps[:2], update=update, init=init)
    params, grads, inputs = steps[2]
    want = update(grads, state, params, inputs)

    restored = {}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "orbax", state)
        checkpointer.wait_until_finished()
        restored["orbax"] = checkpointer.restore(
            tmp_path / "orbax", jax.eval_shape(opt.init, params)
        )
    (tmp_path / "state.msgpack").write_bytes(serialization.to_bytes(state))
    raw = (tmp_path / "state.msgpack").read_bytes()
    restored["flax from_bytes"] = serialization.from_bytes(init(params), raw)
    restored["flax from_state_dict"] = serialization.from_state_dict(
        init(params), serialization.msgpack_restore(raw)
    )
    traces = len(update.traces)
    for how, back in restored.items():
        assert_bit_identical(back, state, f"{name}, {how}: the restored state")
        # (as device arrays, so that the compiled update is reused, not traced again)
        got = update(grads, jax.tree.map(jnp.asarray, back), params, inputs)
        assert_bit_identical(got, want, f"{name}, {how}: the step after restoring")
    assert len(update.traces) == traces, f"{name}: the restored state retraced the update"
