"""The statistics contract shared by every curvature-based transformation.

A captured layer computes ``outputs = inputs @ kernel.reshape(-1, d_out) + bias``
(the bias only when the layer has one). For every such layer the capture
adapters return a :class:`LayerStats` holding, per example:

* dense layers: ``inputs (N, d_in)``, ``output_grads (N, d_out)``,
  ``outputs (N, d_out)``; on inputs ``(N, L_1, ..., d_in)`` the middle axes are
  flattened into ``T`` positions: ``(N, T, d_in)``, ``(N, T, d_out)``;
* convolutions: ``inputs (N, T, kh*kw*c_in)`` (patches, flattened in the
  kernel's own ``(kh, kw, c_in)`` order), ``output_grads (N, T, c_out)``,
  ``outputs (N, T, c_out)``, with ``T`` the number of output positions. The
  example axis ``N`` stays apart from ``T``: the transformations refuse a
  convolution's statistics flattened to ``(N*T, ·)``.

* normalisation layers (kind ``"scale_shift"``, see ``LayerStats.layer_kind``): the
  normalised input ``x̂`` as ``inputs (N, T, F)``, ``output_grads`` and ``outputs (N, T, F)``
  over the ``F`` features their scale and bias span; they are no dense layer (``x̂ ⊙ scale +
  bias``, not ``x̂ @ kernel``), and the layer-wise methods read them only for the diagonal of
  those two parameters.

``output_grads`` are gradients of the *per-example* loss with respect to the
layer's pre-activation output. For a batch-mean loss ``L = mean_n l_n`` that is
``N * dL/ds``.

The statistics of a model are a flat ``dict[str, LayerStats]`` keyed by the
layer's module path joined with ``/`` (for example ``"Encoder_0/Dense_1"``);
the transformation finds that layer's ``kernel`` (and ``bias``) at that path
inside ``params`` (or inside ``params["params"]`` for a Flax variables dict).

What the capture returns is *deferred*: a captured layer's :class:`LayerStats` holds the
arrays the forward and backward passes computed anyway (the layer's input, its output and
the cotangent at its output) and forms the contract's views (the patches of a convolution,
the ``N`` scaling of the output gradients, a ``fisher_batch_size`` slice) when a field is
read. A transformation that updates its statistics every ``stats_period`` steps under
``lax.cond`` reads the fields inside the branch, so the steps that skip the update skip
that work too: on the small CNN of the benchmarks, cutting the patches on every step cost
about as much as SGD-momentum's whole step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import jax


class StatsView(Protocol):
    """How a deferred :class:`LayerStats` forms its fields from the arrays it holds.

    A view is hashable and compares by value (it is the static part of the pytree, so two
    statistics with equal views and equally shaped arrays trace to the same program).
    """

    def inputs(self, arrays: tuple[Any, ...]) -> jax.Array: ...

    def output_grads(self, arrays: tuple[Any, ...]) -> jax.Array: ...

    def outputs(self, arrays: tuple[Any, ...]) -> jax.Array: ...

    #: Optional: ``"dense"`` or ``"conv"``, the kind of layer call the view was captured
    #: from (see ``LayerStats.layer_kind``).
    layer_kind: str


@jax.tree_util.register_pytree_node_class
class LayerStats:
    """Per-example quantities of one dense or convolutional layer.

    Build one from the contract's arrays, ``LayerStats(inputs, output_grads, outputs)``
    (keywords or positions, as a named tuple); it unpacks, indexes and ``_replace``-s like
    one. The capture adapters return *deferred* statistics (:meth:`deferred`) that compute
    the fields when read (see the module docstring); either kind is a pytree whose leaves are
    the arrays it holds.

    Attributes:
      inputs: the layer's inputs, ``(N, d_in)`` for dense layers or the
        flattened patches ``(N, T, kh*kw*c_in)`` for convolutions.
      output_grads: gradients of the per-example loss with respect to the
        pre-activation outputs, ``(N, d_out)`` or ``(N, T, c_out)``.
      outputs: the pre-activation outputs, same shape as ``output_grads``.
    """

    __slots__ = ("_arrays", "_view")
    _fields = ("inputs", "output_grads", "outputs")

    def __init__(self, inputs: Any, output_grads: Any, outputs: Any = None):
        self._arrays = (inputs, output_grads, outputs)
        self._view: StatsView | None = None

    @classmethod
    def deferred(cls, view: StatsView, arrays: tuple[Any, ...]) -> LayerStats:
        """Statistics whose fields are ``view.inputs(arrays)`` etc., formed when read."""
        out = cls.__new__(cls)
        out._arrays = tuple(arrays)
        out._view = view
        return out

    def _formed(self, form: Any) -> Any:
        """``form(arrays)`` of a deferred view (its shape only, for abstract arrays)."""
        if any(isinstance(a, jax.ShapeDtypeStruct) for a in self._arrays):
            return jax.eval_shape(form, self._arrays)  # e.g. the result of jax.eval_shape
        return form(self._arrays)

    def _field(self, index: int) -> Any:
        if self._view is None:
            return self._arrays[index]
        return self._formed(getattr(self._view, self._fields[index]))

    @property
    def layer_kind(self) -> str | None:
        """``"dense"``, ``"conv"`` or ``"scale_shift"`` for statistics the capture made (the
        kind of layer call they come from), ``None`` for statistics built from arrays. The
        transformations use it to tell a dense map over several input axes from a convolution
        with the same kernel shape, and to recognise a normalisation layer's statistics
        (``"scale_shift"``: ``inputs`` is the normalised input ``x̂`` and ``output_grads`` the
        per-example output gradients, both ``(N, T, F)``; the per-example gradients of the
        scale and bias are ``Σ_t x̂ ⊙ g`` and ``Σ_t g``)."""
        return None if self._view is None else getattr(self._view, "layer_kind", None)

    @property
    def inputs(self) -> Any:
        return self._field(0)

    @property
    def output_grads(self) -> Any:
        return self._field(1)

    @property
    def outputs(self) -> Any:
        return self._field(2)

    def input_square_mean(self) -> Any:
        """``(d_in,)``: the mean over examples and positions of the squared inputs, the
        diagonal of ``mean x xᵀ``. For a captured embedding lookup (one-hot inputs) these are
        the token frequencies, computed from the ids without forming the one-hot rows."""
        shortcut = getattr(self._view, "input_square_mean", None)
        if shortcut is not None:
            return self._formed(shortcut)
        return square_mean(self.inputs)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.inputs, self.output_grads, self.outputs))

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return tuple(self)[index]
        return self._field(range(len(self._fields))[index])  # (only that field is formed)

    def _replace(self, **fields: Any) -> LayerStats:
        """New (plain) statistics with the given fields replaced, as ``NamedTuple._replace``."""
        unknown = set(fields) - set(self._fields)
        if unknown:
            raise ValueError(f"LayerStats has no field(s) {sorted(unknown)}")
        return LayerStats(**{f: fields.get(f, getattr(self, f)) for f in self._fields})

    def _asdict(self) -> dict[str, Any]:
        return dict(zip(self._fields, self))

    def __repr__(self) -> str:
        def shape(a: Any) -> Any:
            return None if a is None else tuple(getattr(a, "shape", ()))

        fields = tuple(self) if self._view is None else jax.eval_shape(tuple, self)
        kind = "" if self._view is None else ", deferred"
        shapes = ", ".join(f"{f}={shape(a)}" for f, a in zip(self._fields, fields))
        return f"LayerStats({shapes}{kind})"

    def tree_flatten(self) -> tuple[tuple[Any, ...], StatsView | None]:
        return self._arrays, self._view

    @classmethod
    def tree_unflatten(cls, view: StatsView | None, arrays: Any) -> LayerStats:
        if view is None:
            return cls(*arrays)
        return cls.deferred(view, tuple(arrays))


def square_mean(rows: Any) -> jax.Array:
    """``(d,)``: the mean of ``rows ** 2`` over every axis but the last."""
    x = jax.numpy.asarray(rows)
    return jax.numpy.mean(jax.numpy.square(x.reshape(-1, x.shape[-1])), axis=0)


#: The statistics of a model, ``{layer path: LayerStats}`` (paths joined with ``/``).
LayerStatsDict = dict[str, LayerStats]
