"""Convolution geometry and patch extraction shared by the Flax capture adapters.

A convolution with kernel ``W`` of shape ``(k_1, ..., k_d, c_in, c_out)`` is a
dense layer applied to every input patch: with the patches flattened in the
kernel's own ``(k_1, ..., k_d, c_in)`` order,

    conv(x, W)[n, t, :] == patches(x)[n, t, :] @ W.reshape(-1, c_out)

for every example ``n`` and output position ``t`` (Grosse & Martens 2016,
"A Kronecker-factored approximate Fisher matrix for convolution layers").

The patches here are cut out with strided slices of the padded (and, for
``input_dilation > 1``, interior-padded) input: one slice per kernel offset,
stacked in the kernel's row-major order. This is pure data movement, so the
patches are bit-exact copies of the input values whatever the matmul precision
of the platform, and the order needs no channel-major to kernel-order shuffle
(which ``jax.lax.conv_general_dilated_patches`` would require).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

#: Padding strings that are pre-padding modes in Flax (``jnp.pad`` of the input
#: followed by a ``"VALID"`` convolution) rather than ``lax`` padding types.
PRE_PAD_MODES = ("CIRCULAR", "REFLECT", "CAUSAL")

PaddingLike = Union[str, int, Sequence[int | tuple[int, int]]]


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """The geometry of an N-d, channels-last, feature-group-count-1 convolution.

    Attributes:
      kernel_size: spatial kernel shape ``(k_1, ..., k_d)``.
      strides: window strides, one per spatial dimension.
      padding: a ``lax`` padding string (``"SAME"``, ``"SAME_LOWER"``,
        ``"VALID"``), one of Flax's pre-padding modes (``"CIRCULAR"``,
        ``"REFLECT"``, ``"CAUSAL"``), or a tuple of ``(low, high)`` pairs.
      input_dilation: ``lhs`` dilation, one per spatial dimension.
      kernel_dilation: ``rhs`` dilation, one per spatial dimension.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]

    @property
    def num_spatial(self) -> int:
        """Number of spatial dimensions ``d``."""
        return len(self.kernel_size)

    @property
    def patch_size(self) -> int:
        """Number of kernel offsets ``k_1 * ... * k_d``."""
        return math.prod(self.kernel_size)


def _broadcast(value: None | int | Sequence[int], rank: int, name: str) -> tuple[int, ...]:
    """Broadcasts a Flax-style int-or-sequence option to ``rank`` ints.

    Args:
      value: ``None`` (meaning 1, as in Flax), an int, or a sequence of ``rank``
        ints.
      rank: number of spatial dimensions.
      name: option name used in the error message.

    Returns:
      A tuple of ``rank`` ints.
    """
    if value is None:
        value = 1
    if isinstance(value, (int, np.integer)):
        return (int(value),) * rank
    out = tuple(int(v) for v in value)
    if len(out) != rank:
        raise ValueError(
            f"{name}={value!r} does not have one entry per spatial dimension ({rank})."
        )
    return out


def canonicalize_padding(padding: PaddingLike, rank: int) -> str | tuple[tuple[int, int], ...]:
    """Puts a Flax padding option in canonical form, with Flax's own rules.

    Args:
      padding: a string, an int (same padding on both sides of every spatial
        dimension), or a sequence of ``rank`` entries, each an int (both sides)
        or a ``(low, high)`` pair.
      rank: number of spatial dimensions.

    Returns:
      The upper-cased padding string, or a tuple of ``rank`` ``(low, high)``
      pairs.
    """
    if isinstance(padding, str):
        return padding.upper()
    if isinstance(padding, (int, np.integer)):
        return ((int(padding), int(padding)),) * rank
    pairs = []
    for p in padding:
        if isinstance(p, (int, np.integer)):
            pairs.append((int(p), int(p)))
        else:
            lo, hi = p
            pairs.append((int(lo), int(hi)))
    if len(pairs) != rank:
        raise ValueError(
            f"padding={padding!r} does not have one entry per spatial dimension ({rank})."
        )
    return tuple(pairs)


def make_geometry(
    kernel_size: int | Sequence[int],
    strides: None | int | Sequence[int],
    padding: PaddingLike,
    input_dilation: None | int | Sequence[int],
    kernel_dilation: None | int | Sequence[int],
) -> ConvGeometry:
    """Builds a :class:`ConvGeometry` from the options of a Flax ``Conv`` layer.

    Args:
      kernel_size: an int (1-d convolution) or a sequence of ints.
      strides: ``None`` (1), an int or one int per spatial dimension.
      padding: any padding that Flax's ``Conv`` accepts.
      input_dilation: ``None`` (1), an int or one int per spatial dimension.
      kernel_dilation: ``None`` (1), an int or one int per spatial dimension.

    Returns:
      The canonical geometry.
    """
    if isinstance(kernel_size, (int, np.integer)):
        ks: tuple[int, ...] = (int(kernel_size),)
    else:
        ks = tuple(int(k) for k in kernel_size)
    rank = len(ks)
    return ConvGeometry(
        kernel_size=ks,
        strides=_broadcast(strides, rank, "strides"),
        padding=canonicalize_padding(padding, rank),
        input_dilation=_broadcast(input_dilation, rank, "input_dilation"),
        kernel_dilation=_broadcast(kernel_dilation, rank, "kernel_dilation"),
    )


def _dilated_kernel(geometry: ConvGeometry) -> tuple[int, ...]:
    """Spatial extent of the kernel after kernel dilation."""
    return tuple((k - 1) * d + 1 for k, d in zip(geometry.kernel_size, geometry.kernel_dilation))


def _pre_pad(
    x: jax.Array, geometry: ConvGeometry
) -> tuple[jax.Array, str | tuple[tuple[int, int], ...]]:
    """Applies Flax's CIRCULAR / REFLECT / CAUSAL pre-padding, as ``flax`` does.

    Args:
      x: input of shape ``(N, *spatial, c_in)``.
      geometry: the layer's geometry.

    Returns:
      The (possibly) pre-padded input and the padding that remains to apply
      (``"VALID"`` after a pre-padding).
    """
    padding = geometry.padding
    if padding in ("CIRCULAR", "REFLECT"):
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in _dilated_kernel(geometry)] + [(0, 0)]
        mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
        return jnp.pad(x, pads, mode=mode), "VALID"
    if padding == "CAUSAL":
        if geometry.num_spatial != 1:
            raise ValueError("Causal padding is only implemented for 1D convolutions.")
        left = geometry.kernel_dilation[0] * (geometry.kernel_size[0] - 1)
        return jnp.pad(x, [(0, 0), (left, 0), (0, 0)]), "VALID"
    return x, padding


def extract_patches(x: jax.Array, geometry: ConvGeometry) -> jax.Array:
    """Cuts a channels-last input into the patches a convolution contracts.

    Args:
      x: input of shape ``(N, *spatial, c_in)`` (exactly one batch axis).
      geometry: the convolution's geometry.

    Returns:
      Patches of shape ``(N, T, k_1 * ... * k_d * c_in)`` with ``T`` the number
      of output positions (row-major over the output's spatial axes) and the
      features flattened in the kernel's ``(k_1, ..., k_d, c_in)`` order, so
      that ``patches @ kernel.reshape(-1, c_out)`` equals the convolution.
    """
    rank = geometry.num_spatial
    if x.ndim != rank + 2:
        raise ValueError(
            f"expected an input of rank {rank + 2} (N, *spatial, C), got shape {x.shape}."
        )
    x, padding = _pre_pad(x, geometry)
    n, c_in = x.shape[0], x.shape[-1]
    dilated = _dilated_kernel(geometry)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[1:-1], dilated, geometry.strides, padding)
    else:
        pads = padding
    config = (
        [(0, 0, 0)]
        + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, geometry.input_dilation)]
        + [(0, 0, 0)]
    )
    xp = lax.pad(x, jnp.zeros((), x.dtype), config)
    out_sizes = [
        (size - dk) // s + 1 if size >= dk else 0
        for size, dk, s in zip(xp.shape[1:-1], dilated, geometry.strides)
    ]
    if 0 in out_sizes:
        return jnp.zeros((n, 0, geometry.patch_size * c_in), x.dtype)
    slices = []
    for offsets in itertools.product(*(range(k) for k in geometry.kernel_size)):
        start = [0] + [o * d for o, d in zip(offsets, geometry.kernel_dilation)] + [0]
        limit = (
            [n]
            + [st + (m - 1) * s + 1 for st, m, s in zip(start[1:], out_sizes, geometry.strides)]
            + [c_in]
        )
        slices.append(lax.slice(xp, start, limit, [1, *geometry.strides, 1]))
    patches = jnp.stack(slices, axis=-2)  # (N, *out, K, c_in), K in kernel order
    return patches.reshape(n, math.prod(out_sizes), geometry.patch_size * c_in)
