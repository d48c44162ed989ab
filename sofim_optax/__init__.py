"""sofim_optax: second-order, curvature-aware optimizers as optax transformations.

Every optimizer is an ``optax.GradientTransformationExtraArgs``: chain it,
schedule it, wrap it in ``optax.inject_hyperparams`` or ``optax.MultiSteps``,
and jit your own train step. ``scale_by_<method>`` holds the algorithm (no
learning rate, no sign); ``<method>(learning_rate, ...)`` is the ready alias.
"""

from sofim_optax import _cpu_runtime

_cpu_runtime.configure()  # before anything initialises JAX's backend; see _cpu_runtime.py

from sofim_optax import curvature, linalg  # noqa: E402
from sofim_optax.curvature import LayerStats  # noqa: E402
from sofim_optax.kfac import KfacCurvature, ScaleByKfacState, kfac, scale_by_kfac  # noqa: E402
from sofim_optax.linalg import damped_kron_solve, sherman_morrison_solve  # noqa: E402
from sofim_optax.sofim import ScaleBySofimState, scale_by_sofim, sofim  # noqa: E402

__version__ = "0.1.0.dev0"

__all__ = [
    "__version__",
    "curvature",
    "linalg",
    "LayerStats",
    "damped_kron_solve",
    "sherman_morrison_solve",
    "KfacCurvature",
    "ScaleByKfacState",
    "scale_by_kfac",
    "kfac",
    "ScaleBySofimState",
    "scale_by_sofim",
    "sofim",
]
