"""A multiply-add count of every method's train step, per component, from the captured layers.

The model counts what each method's algorithm must compute, layer by layer, from the shapes
``value_grad_and_stats`` captures: ``N`` examples, ``T`` output positions (1 for a dense
layer), ``d_a = d_in + 1`` (the homogeneous input or conv patch, bias last) and ``d_g = d_out``.
One *MAC* (multiply-add) is two of XLA's flops. Element-wise work (activations, the optimizer's
moments, damping divisions) is left out: on the models benchmarked here it is under 1 % of the
matrix products.

Components, per train step (``step_cost``; an amortised figure divides a periodic part by
its period):

============== ==================================================================================
component      what it counts
============== ==================================================================================
gradient       forward ``Σ N·T·d_in·d_out``, weight gradients (the same), input gradients
               (the same, every layer but the first)
sampled Fisher the second backward pass for sampled targets (input gradients only)
statistics     the method's curvature statistics (KFAC: ``N·T·(d_a² + d_g²)`` per layer); for
               the KPSVD family one solver iteration costs ``2·N·T·(d_a² + d_g²)`` and is
               multiplied by the iterations the solver ran (read from the optimizer state)
refresh        eigendecompositions / inverses / generalised eigenproblems, ``c·d³`` per
               factor (``c`` below), divided by ``inverse_period``
precondition   applying the curvature to the gradient every step (KFAC ``eigh``:
               ``2·d_a·d_g·(d_a + d_g)``; with explicit inverses half that)
extra passes   K-BFGS's previous-batch pass, the adaptive step's Jacobian-vector products and
               loss at the new point, AdaHessian's Hessian-vector product
============== ==================================================================================

Besides MACs, :attr:`StepCost.precondition_floats` counts the curvature state the
preconditioning reads on every step, and :func:`memory_floor` turns both into a roofline
time for steps whose preconditioning is bound by memory (Mini-Block Fisher's ``P·s`` floats
of inverses for ``P·s`` MACs).

``c`` for the decompositions (LAPACK on CPU): symmetric eigendecomposition with eigenvectors
``4·d³`` MACs (tridiagonal reduction ``⅔d³``, divide and conquer and back-transformation the
rest; the textbook range is 4–9 d³), Cholesky and the inverse from it ``d³`` (``⅓d³`` each
for the factor, the triangular inverse and the product). These are estimates: XLA does not
count LAPACK calls, so they are checked against time, not against ``cost_analysis()``.

``xla_view`` is what XLA's ``cost_analysis()`` of the compiled step should report: both sides
of a ``lax.cond`` are counted (so a refresh is in every step, unamortised), a
``lax.while_loop`` or ``lax.scan`` body once whatever its trip count, and LAPACK custom calls
(``eigh``, ``cholesky``) not at all. :mod:`experiments.benchmarks.floor` compares the two.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

import sofim_optax
from sofim_optax import layerwise, mini_blocks
from sofim_optax.curvature import linen as curvature_linen

__all__ = [
    "EIGH_MACS",
    "CHOLESKY_INVERSE_MACS",
    "LayerShape",
    "StepCost",
    "captured_layers",
    "gradient_cost",
    "step_cost",
    "memory_floor",
    "METHODS",
]

#: MACs of a symmetric eigendecomposition with eigenvectors, per ``d³``.
EIGH_MACS = 4.0
#: MACs of a Cholesky factorisation plus the explicit inverse from it, per ``d³``.
CHOLESKY_INVERSE_MACS = 1.0


def xla_counted_inverse(d: float) -> float:
    """What ``cost_analysis()`` counts of one damped inverse (``"cholesky"``/``"inv"``) of size
    ``d``: the factorisation is a LAPACK call, but XLA expands the triangular solves and the
    breakdown check partly into counted operations, ``≈ 0.13·d³ + 3·d²`` (fitted on stacks of
    sizes 9 to 500 on CPU)."""
    return 0.13 * d**3 + 3.0 * d**2


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One captured layer as the cost model sees it: the library's own
    :class:`sofim_optax.layerwise.Layer` (path, kind, ``d_in``, ``d_out``, bias) and what the
    statistics add.

    Attributes:
      layer: the layer as :func:`sofim_optax.layerwise.discover_layers` finds it.
      batch: ``N``.
      positions: ``T``, output positions per example (1 for a dense layer on vectors).
      first: whether its input is the model's input (no input gradient is computed).
    """

    layer: layerwise.Layer
    batch: int
    positions: int
    first: bool

    def __getattr__(self, name: str) -> Any:
        # The shape attributes are the layer's own (path, kind, d_in, d_out, has_bias, d_a,
        # d_g), read through: one definition of d_a and d_g for the library and the model.
        if name == "layer":  # (not set yet, e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.layer, name)

    @property
    def rows(self) -> int:
        """``N·T``: the samples of the layer's statistics."""
        return self.batch * self.positions

    @property
    def forward(self) -> float:
        """MACs of the layer's forward product."""
        return float(self.rows) * self.d_in * self.d_out


@dataclasses.dataclass
class StepCost:
    """MACs of one train step, by component.

    Attributes:
      amortised: ``{component: MACs per step}`` with periodic parts divided by their period.
      xla_view: MACs as XLA's ``cost_analysis()`` counts the compiled step (see the module
        docstring).
      state_floats: floats held by the optimizer state (parameter-sized buffers included).
      precondition_floats: floats of curvature state the preconditioning reads on every
        step (the kept inverses, eigenvectors or BFGS matrices; 0 for the first-order and
        diagonal methods, whose per-parameter buffers SGD-m's own step already streams).
        A method whose preconditioning reads more bytes than its arithmetic can hide is
        bound by memory: see :func:`memory_floor`.
    """

    amortised: dict[str, float]
    xla_view: float
    state_floats: float
    precondition_floats: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.amortised.values())


def memory_floor(cost: StepCost, macs_per_second: float, bytes_per_second: float) -> float:
    """The step's floor in seconds when its preconditioning may be bound by memory.

    Every component takes its MACs at ``macs_per_second`` (what SGD-m's measured step
    achieves), except the preconditioning, which takes the longer of its MACs at that rate
    and its :attr:`StepCost.precondition_floats` (float32, 4 bytes each) at
    ``bytes_per_second`` (the machine's measured streaming rate): a roofline for the one
    component that reads a large state on every step.
    """
    precondition = cost.amortised.get("precondition", 0.0)
    stream = 4.0 * cost.precondition_floats / bytes_per_second
    rest = (cost.total - precondition) / macs_per_second
    return rest + max(precondition / macs_per_second, stream)


def captured_layers(loss_fn: Callable, params: Any, *batch: Any) -> list[LayerShape]:
    """The layers ``value_grad_and_stats`` captures for ``loss_fn(params, *batch)``, from
    shapes alone (``jax.eval_shape``: nothing is computed)."""
    _, _, stats = jax.eval_shape(
        lambda p, *b: curvature_linen.value_grad_and_stats(loss_fn, p, *b), params, *batch
    )
    layout = layerwise.discover_layers(params)
    x = batch[0]
    features = x.shape[-1]
    flat_width = math.prod(x.shape[1:])
    shapes = []
    for layer in layout.layers:
        if layer.path not in stats:
            continue
        inputs = stats[layer.path].inputs
        positions = inputs.shape[1] if inputs.ndim == 3 else 1
        # The model's input feeds the layer whose input width is the data's (no input
        # gradient is formed for it); a heuristic that holds for the benchmarked models.
        first = (layer.kind == "conv" and layer.kernel_shape[-2] == features) or (
            layer.kind == "dense" and layer.d_in == flat_width
        )
        shapes.append(LayerShape(layer, int(inputs.shape[0]), int(positions), first))
    return shapes


def gradient_cost(layers: list[LayerShape], fisher: str) -> dict[str, float]:
    """``{"gradient": forward + backward MACs, "sampled Fisher": its extra backward pass}``."""
    forward = sum(layer.forward for layer in layers)
    input_grads = sum(layer.forward for layer in layers if not layer.first)
    out = {"gradient": 2 * forward + input_grads}
    if fisher == "sampled":
        out["sampled Fisher"] = input_grads
    return out


def _defaults(alias: Callable, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """``hparams`` completed with the alias's own defaults (read from its signature)."""
    out = {
        k: p.default
        for k, p in inspect.signature(alias).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    out.update(hparams)
    return out


def _factor_dims(layers: list[LayerShape]) -> list[int]:
    return [d for layer in layers for d in (layer.d_a, layer.d_g)]


def _kron_precondition(layers: list[LayerShape], rotations: int) -> float:
    """``rotations`` pairs of products ``X·V·Y`` per layer (1: inverses, 2: eigenvectors)."""
    return rotations * sum(la.d_a * la.d_g * (la.d_a + la.d_g) for la in layers)


def _kfac_statistics(layers: list[LayerShape]) -> float:
    return sum(float(la.rows) * (la.d_a**2 + la.d_g**2) for la in layers)


# --------------------------------------------------------------------------------------
# One function per method: (layers, hyperparameters, measured) -> StepCost.
# ``measured`` holds what only a run knows (the KPSVD family's solver iterations).
# --------------------------------------------------------------------------------------


def _first_order(layers, h, measured, moments: int) -> StepCost:
    params = sum(la.d_a * la.d_g for la in layers)
    return StepCost({}, 0.0, moments * params)


def _kfac(layers, h, measured) -> StepCost:
    inverse, sp, ip = h["inverse"], h["stats_period"], h["inverse_period"]
    dims = _factor_dims(layers)
    stats = _kfac_statistics(layers)
    cube = sum(float(d) ** 3 for d in dims)
    if inverse == "eigh":
        refresh, rotations, stored = EIGH_MACS * cube, 2, sum(2 * d * d + d for d in dims)
        refresh_xla = 0.0
    else:
        refresh, rotations, stored = CHOLESKY_INVERSE_MACS * cube, 1, sum(2 * d * d for d in dims)
        refresh_xla = sum(xla_counted_inverse(d) for d in dims)
    precondition = _kron_precondition(layers, rotations)
    params = sum(la.d_a * la.d_g for la in layers)
    read = sum(d * d + (d if inverse == "eigh" else 0) for d in dims)  # eigenvectors/inverses
    return StepCost(
        {"statistics": stats / sp, "refresh": refresh / ip, "precondition": precondition},
        stats + refresh_xla + precondition,
        stored + 2 * params,  # + the momentum and the fallback's diagonal
        read,
    )


def _kpsvd_family(kind: str):
    def cost(layers, h, measured) -> StepCost:
        sp, ip = h["stats_period"], h["inverse_period"]
        iterations = measured.get("solver_iterations")  # (n_layers, rank) or None
        rank = 1 if kind == "kpsvd" else 2
        krylov = h.get("krylov_dim") or 1
        stats = xla_stats = 0.0
        for i, la in enumerate(layers):
            one_iteration = 2.0 * la.rows * (la.d_a**2 + la.d_g**2)  # matvec + rmatvec
            if kind == "lanczos":
                # one pass: ``krylov_dim`` matvecs and rmatvecs, both terms from one space
                runs = float(iterations[i][0]) if iterations is not None else 1.0
                stats += runs * krylov * one_iteration
                xla_stats += krylov * one_iteration
                continue
            terms = 1 if kind in ("kpsvd", "kfac_corrected") else rank
            for term in range(terms):
                runs = float(iterations[i][term]) if iterations is not None else 1.0
                # a start matvec, then the loop's iterations
                stats += (runs + 0.5) * one_iteration
                xla_stats += 1.5 * one_iteration
            if kind == "kfac_corrected":  # KFAC's A and G as well
                stats += la.rows * (la.d_a**2 + la.d_g**2)
                xla_stats += la.rows * (la.d_a**2 + la.d_g**2)
        dims = _factor_dims(layers)
        cube = sum(float(d) ** 3 for d in dims)
        if rank == 1:
            refresh, refresh_xla = EIGH_MACS * cube, 0.0
        else:
            # generalised eigenproblem per factor: two eigh and W ᵀ F₂ W, W·E
            refresh, refresh_xla = (2 * EIGH_MACS + 3) * cube, 3 * cube
        precondition = _kron_precondition(layers, 2)
        stored = rank * sum(d * d for d in dims) + sum(d * d + d for d in dims)
        params = sum(la.d_a * la.d_g for la in layers)
        return StepCost(
            {"statistics": stats / sp, "refresh": refresh / ip, "precondition": precondition},
            xla_stats + refresh_xla + precondition,
            stored + 2 * params,  # + the momentum and the fallback's diagonal
            sum(d * d + d for d in dims),  # the eigenvectors and eigenvalues
        )

    return cost


def _mbf(layers, h, measured) -> StepCost:
    sp, ip, inverse = h["stats_period"], h["inverse_period"], h["inverse"]
    stats = xla_stats = refresh = refresh_xla = precondition = stored = read = 0.0
    for la in layers:
        blocking = mini_blocks.layer_blocking(la.layer, h["dense_block_size"])
        segments = blocking.segments  # ((size, count), ...)
        if la.kind == "dense" and la.positions == 1:
            tri = blocking.chunk * (blocking.chunk + 1) // 2
            work = float(la.batch) * la.d_g * blocking.n_chunks * tri
            per_example = blocking.n_chunks * tri + la.d_out
        else:
            block_outer = sum(size * size * count for size, count in segments)
            work = float(la.rows) * la.d_a * la.d_g + float(la.batch) * block_outer
            per_example = la.d_a * la.d_out + la.positions * (la.d_a + la.d_out)
        chunk = mini_blocks._batch_chunks(la.batch, per_example, h.get("batch_chunk"))
        stats += work
        xla_stats += work * min(1.0, chunk / la.batch)  # a scan over chunks counts once
        for size, count in segments:
            c = EIGH_MACS if inverse == "eigh" else CHOLESKY_INVERSE_MACS
            refresh += c * count * float(size) ** 3
            if inverse != "eigh":
                refresh_xla += count * xla_counted_inverse(size)
            precondition += (2 if inverse == "eigh" else 1) * count * float(size) ** 2
            # the packed EMA blocks, and the square inverses or eigenvectors (+ eigenvalues)
            kept = count * size * size + (count * size if inverse == "eigh" else 0)
            stored += count * mini_blocks.packed_size(size) + kept
            read += kept  # the step reads all of what the refresh keeps
    params = sum(la.d_a * la.d_g for la in layers)
    return StepCost(
        {"statistics": stats / sp, "refresh": refresh / ip, "precondition": precondition},
        xla_stats + refresh_xla + precondition,
        stored + 2 * params,  # + the gradient momentum and the fallback's diagonal
        read,
    )


def _kbfgs(layers, h, measured) -> StepCost:
    memory = h.get("memory")
    stats = sum(float(la.rows) * la.d_a**2 for la in layers)  # A only
    small = 0.0  # the BFGS updates of H_a and H_g and their matvecs
    for la in layers:
        small += 6.0 * la.d_a**2 + (4.0 * la.d_g**2 if memory is None else 0.0)
    if memory is None:
        precondition = _kron_precondition(layers, 1)
        stored = sum(2 * la.d_a**2 + la.d_g**2 for la in layers)
        read = sum(la.d_a**2 + la.d_g**2 for la in layers)  # H_a and H_g
    else:
        # the compact L-BFGS product on the d_a columns of H_a V, and on one vector for y
        m = memory
        precondition = sum(la.d_a**2 * la.d_g for la in layers) + sum(
            4.0 * m * la.d_g * (la.d_a + 1) + 2.0 * m * m * (la.d_a + 2 * la.d_g) for la in layers
        )
        stored = sum(2 * la.d_a**2 + 2 * m * la.d_g for la in layers)
        read = sum(la.d_a**2 + 2 * m * la.d_g for la in layers)  # H_a and the (s, y) pairs
    forward = sum(la.forward for la in layers)
    input_grads = sum(la.forward for la in layers if not la.first)
    previous_pass = forward + input_grads  # the previous batch at the current parameters
    params = sum(la.d_a * la.d_g for la in layers)
    parts = {
        "statistics": stats + small,
        "precondition": precondition,
        "previous-batch pass": previous_pass,
    }
    # The exact H_a = (A + √λ I)⁻¹ of the first step (under lax.cond, so in every compiled
    # step): an eigendecomposition (LAPACK, uncounted) and the product Q diag Qᵀ.
    first_inverse = sum(float(la.d_a) ** 3 for la in layers)
    # + the momentum and the fallback's diagonal
    return StepCost(parts, sum(parts.values()) + first_inverse, stored + 2 * params, read)


def _adahessian(layers, h, measured) -> StepCost:
    forward = sum(la.forward for la in layers)
    input_grads = sum(la.forward for la in layers if not la.first)
    gradient = 2 * forward + input_grads
    first = sum(la.forward for la in layers if la.first)
    # forward-over-reverse: the forward pass again, and the tangent of every product of the
    # gradient's computation (two per product, one for the first layer's forward)
    hvp = h["num_probes"] * (forward + 2 * gradient - first)
    params = sum(la.d_a * la.d_g for la in layers)
    return StepCost({"Hessian-vector product": hvp / h["stats_period"]}, hvp, 2 * params)


METHODS: dict[str, tuple[Callable, Callable]] = {
    # registry name: (the library alias whose defaults apply, the cost function)
    "sgdm": (None, lambda la, h, m: _first_order(la, h, m, 1)),
    "adam": (None, lambda la, h, m: _first_order(la, h, m, 2)),
    "sofim": (sofim_optax.sofim, lambda la, h, m: _first_order(la, h, m, 1)),
    "kfac": (sofim_optax.kfac, _kfac),
    "kpsvd": (sofim_optax.kpsvd, _kpsvd_family("kpsvd")),
    "kpsvd_deflation": (sofim_optax.kpsvd_deflation, _kpsvd_family("deflation")),
    "kfac_corrected": (sofim_optax.kfac_corrected, _kpsvd_family("kfac_corrected")),
    "kpsvd_lanczos": (sofim_optax.kpsvd_lanczos, _kpsvd_family("lanczos")),
    "mbf": (sofim_optax.mbf, _mbf),
    "kbfgs": (sofim_optax.kbfgs, _kbfgs),
    "kbfgs_l": (sofim_optax.kbfgs_l, _kbfgs),
    "adahessian": (sofim_optax.adahessian, _adahessian),
}


def adaptive_cost(layers: list[LayerShape], h: Mapping[str, Any]) -> dict[str, float]:
    """The extra MACs of :func:`sofim_optax.scale_by_quadratic_model` per step: the
    linearisation's forward pass, one tangent per direction (two products per layer, one for
    the first), and the loss at the new point every ``damping_period`` steps."""
    forward = sum(la.forward for la in layers)
    first = sum(la.forward for la in layers if la.first)
    directions = 2 if h.get("adapt_momentum", True) else 1
    return {
        "adaptive products": forward + directions * (2 * forward - first),
        "adaptive loss": forward / h.get("damping_period", 5),
    }


def step_cost(
    name: str,
    layers: list[LayerShape],
    *,
    fisher: str = "empirical",
    hparams: Mapping[str, Any] | None = None,
    measured: Mapping[str, Any] | None = None,
) -> StepCost:
    """The :class:`StepCost` of registry method ``name`` on ``layers``, at the library alias's
    defaults updated by ``hparams``. ``"<method>_adaptive"`` is the method's adaptive alias:
    the method's cost plus the quadratic model's passes (:func:`adaptive_cost`)."""
    adaptive = name.endswith("_adaptive")
    base = name[: -len("_adaptive")] if adaptive else name
    alias, fn = METHODS[base]
    if adaptive:
        alias = getattr(sofim_optax, name)
    h = _defaults(alias, hparams or {}) if alias is not None else dict(hparams or {})
    cost = fn(layers, h, measured or {})
    gradient = gradient_cost(layers, fisher)
    parts = {**gradient, **cost.amortised}
    xla = sum(gradient.values()) + cost.xla_view
    if adaptive:
        extra = adaptive_cost(layers, h)
        parts.update(extra)
        # the loss at the new point is under a lax.cond: in every compiled step
        xla += extra["adaptive products"] + extra["adaptive loss"] * h["damping_period"]
    return StepCost(parts, xla, cost.state_floats, cost.precondition_floats)


def tree_floats(tree: Any) -> float:
    """Floats (array elements) in a pytree of arrays or shape structs."""
    return float(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))
