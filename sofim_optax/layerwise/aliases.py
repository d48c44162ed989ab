"""The alias shape shared by KFAC and the KPSVD family: preconditioner, weight decay,
heavy-ball momentum on the preconditioned direction, learning rate."""

from __future__ import annotations

from typing import Any

import optax

from sofim_optax.hyperparameters import Scalar, ScalarOrSchedule

__all__ = ["momentum_alias"]


def momentum_alias(
    scale: optax.GradientTransformation,
    *,
    learning_rate: ScalarOrSchedule,
    momentum: Scalar | None,
    weight_decay: Scalar,
    weight_decay_mask: Any,
    nesterov: bool,
) -> optax.GradientTransformationExtraArgs:
    """``chain(scale, add_decayed_weights(weight_decay, weight_decay_mask), trace(momentum,
    nesterov), scale_by_learning_rate(learning_rate))``, the momentum term left out when
    ``momentum is None``."""
    parts = [scale, optax.add_decayed_weights(weight_decay, weight_decay_mask)]
    if momentum is not None:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
