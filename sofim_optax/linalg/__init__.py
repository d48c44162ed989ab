"""Pure array math for one block at a time.

Nothing here knows about optax or Flax. Every function works on a single block and
is meant to be ``jax.vmap``-ed by its caller over stacks of blocks of the same
shape. All functions are jittable and differentiable. One family per file:

* ``solves.py``: Sherman–Morrison, damped Kronecker-factored solves and inverses.
* ``bfgs.py``: BFGS inverse update, K-BFGS double damping, L-BFGS inverse matvec.
* ``kronecker_svd.py``: nearest Kronecker products of a Fisher block (KPSVD family).
* ``kron_sum.py``: the damped solve with a sum of two Kronecker products.
"""

# Each module's __all__ is its public API; the package re-exports all of them.
from sofim_optax.linalg import bfgs, kron_sum, kronecker_svd, solves
from sofim_optax.linalg.bfgs import *  # noqa: F403
from sofim_optax.linalg.kron_sum import *  # noqa: F403
from sofim_optax.linalg.kronecker_svd import *  # noqa: F403
from sofim_optax.linalg.solves import *  # noqa: F403

__all__ = [*solves.__all__, *bfgs.__all__, *kronecker_svd.__all__, *kron_sum.__all__]
