"""Pure array math for one block at a time.

Nothing here knows about optax or Flax. Every function works on a single block and
is meant to be ``jax.vmap``-ed by its caller over stacks of blocks of the same
shape. All functions are jittable and differentiable. One family per file:

* ``_solves.py``: Sherman–Morrison, damped Kronecker-factored solves and inverses.
* ``bfgs.py``: BFGS inverse update, K-BFGS double damping, L-BFGS inverse matvec.
* ``kronecker_svd.py``: nearest Kronecker products of a Fisher block (KPSVD family).
* ``kron_sum.py``: the damped solve with a sum of two Kronecker products.
"""

from sofim_optax.linalg._solves import (
    DAMPING_FLOOR,
    PI_RANGE,
    damped_inverse,
    damped_kron_solve,
    damped_kron_solve_eigh,
    factored_damping,
    sherman_morrison_solve,
)
from sofim_optax.linalg.bfgs import bfgs_inverse_update, double_damping, lbfgs_inverse_matvec
from sofim_optax.linalg.kron_sum import (
    INDEFINITE_MODES,
    generalized_eigh,
    kron_sum_apply,
    kron_sum_factors,
    kron_sum_solve,
)
from sofim_optax.linalg.kronecker_svd import (
    nearest_kronecker,
    rearrange,
    rearranged_matvec,
    rearranged_rmatvec,
)

__all__ = [
    "sherman_morrison_solve",
    "DAMPING_FLOOR",
    "PI_RANGE",
    "factored_damping",
    "damped_kron_solve",
    "damped_kron_solve_eigh",
    "damped_inverse",
    "bfgs_inverse_update",
    "double_damping",
    "lbfgs_inverse_matvec",
    "nearest_kronecker",
    "rearrange",
    "rearranged_matvec",
    "rearranged_rmatvec",
    "generalized_eigh",
    "kron_sum_factors",
    "kron_sum_apply",
    "kron_sum_solve",
    "INDEFINITE_MODES",
]
