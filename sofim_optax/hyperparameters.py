"""Hyperparameter types and checks shared by every method.

Every method validates its hyperparameters with these functions when the transformation is
built, so that a bad value fails with the same message wherever it is passed. Only concrete
Python numbers can be checked then: under ``optax.inject_hyperparams`` a value arrives as a
traced array and is used as it is.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Union

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "Scalar",
    "ScalarOrSchedule",
    "accumulation_dtype",
    "check_nonnegative",
    "check_decay",
    "check_damping",
    "check_positive",
    "check_positive_int",
    "check_choice",
    "structural",
]

#: A hyperparameter that may be a Python float or a (possibly traced) scalar array, the form
#: every value takes under ``optax.inject_hyperparams``.
Scalar = Union[float, jax.Array]
#: A learning rate, a scalar or an optax schedule ``count -> value``.
ScalarOrSchedule = optax.ScalarOrSchedule


def accumulation_dtype(*dtypes_or_arrays: Any) -> jnp.dtype:
    """The dtype statistics and solves run in: at least float32 (bfloat16 and float16 are
    promoted to float32, float64 stays float64)."""
    dtypes = [getattr(x, "dtype", x) for x in dtypes_or_arrays]
    return jnp.promote_types(jnp.result_type(jnp.float32, *dtypes), jnp.float32)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_decay(where: str, name: str, value: Any) -> None:
    """A decay (EMA, momentum, ``b1``) must lie in ``[0, 1)``."""
    if _is_number(value) and not 0.0 <= value < 1.0:
        raise ValueError(f"{where}: {name} must be in [0, 1), got {value!r}")


def check_damping(where: str, value: Any, name: str = "damping") -> None:
    """A damping given as a number must be finite and ``> 0``.

    A minibatch's curvature estimate is singular (its rank is at most the batch size times
    the outputs), so an undamped solve is unbounded in the directions the batch did not see:
    ``damping=0`` diverged within a few steps in every curvature method. A traced damping
    (``optax.inject_hyperparams``, a schedule) cannot be checked here; the solves floor it at
    ``linalg.DAMPING_FLOOR`` (``1e-12``), which keeps them finite but not well scaled.
    """
    if _is_number(value) and not (value > 0.0 and math.isfinite(value)):
        raise ValueError(
            f"{where}: {name} must be a finite number > 0, got {value!r}. A minibatch's "
            "curvature is singular, so an undamped solve is unbounded (damping=0 diverges "
            f"within a few steps); start from the default and see {where}'s docstring for "
            "the scale the damping lives on (it grows with the loss's scale)."
        )


def check_positive(where: str, name: str, value: Any) -> None:
    """A finite number ``> 0``."""
    if _is_number(value) and not (value > 0.0 and math.isfinite(value)):
        raise ValueError(f"{where}: {name} must be a finite number > 0, got {value!r}")


def check_nonnegative(where: str, name: str, value: Any) -> None:
    """A finite number ``>= 0``."""
    if _is_number(value) and not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")


def check_positive_int(where: str, name: str, value: Any, *, static: bool = False) -> None:
    """A positive integer (a period, an iteration count, a block size).

    With ``static=True`` the value sets a shape or an unrolled loop, so it must be a Python
    ``int`` (``TypeError`` otherwise, naming ``static_args``: under
    ``optax.inject_hyperparams`` it arrives as an array unless listed there). Without it, an
    array is accepted as it is (it may be traced).
    """
    if static and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(
            f"{where}: {name} must be a Python int, got {value!r}. It fixes array shapes, so it "
            f"cannot be traced: under optax.inject_hyperparams, list {name!r} in static_args."
        )
    if isinstance(value, bool) or (_is_number(value) and (value < 1 or value != int(value))):
        raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")


def check_choice(where: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """One of a fixed set of strings."""
    if value not in choices:
        raise ValueError(f"{where}: {name} must be one of {choices}, got {value!r}")


def structural(*names: str):
    """Marks the arguments of a factory that fix array shapes or unrolled loops.

    They must stay Python values: under ``optax.inject_hyperparams`` (which turns every
    numeric argument, defaults included, into an array) list them in ``static_args``. The
    decorator records them as the factory's ``static_args`` attribute, so that::

        optax.inject_hyperparams(sofim_optax.mbf, static_args=sofim_optax.mbf.static_args)

    always works.
    """

    def mark(fn):
        fn.static_args = tuple(names)
        return fn

    return mark
