"""sofim_optax: second-order, curvature-aware optimizers as optax transformations.

Every optimizer is an ``optax.GradientTransformationExtraArgs``: chain it,
schedule it, wrap it in ``optax.inject_hyperparams`` or ``optax.MultiSteps``,
and jit your own train step. ``scale_by_<method>`` holds the algorithm (no
learning rate, no sign); ``<method>(learning_rate, ...)`` is the ready alias.

Extra ``update`` arguments, keyword-only: ``layer_stats=`` (KFAC, the KPSVD
family, Mini-Block Fisher, K-BFGS; from ``curvature.linen`` / ``curvature.nnx``),
``previous_batch_stats=`` (K-BFGS, on every update; see ``curvature.two_pass``) and ``obj_fn=``
(AdaHessian, Nyström-SGD: the minibatch loss as a function of the parameters).

Every hyperparameter after ``learning_rate`` is keyword-only, and each name means the same
thing in every method (``docs/arguments.md``). On CPU, call :func:`configure_cpu_runtime`
before the first JAX computation (see :mod:`sofim_optax.cpu_runtime`).
"""

from sofim_optax import adaptive as adaptive_module
from sofim_optax import curvature, distributed, guards, hyperparameters, layerwise, linalg
from sofim_optax import kpsvd as kpsvd_module
from sofim_optax.adahessian import ScaleByAdaHessianState, adahessian, scale_by_adahessian
from sofim_optax.adaptive import *  # noqa: F403  (the adaptive aliases)
from sofim_optax.cpu_runtime import configure_cpu_runtime
from sofim_optax.curvature import LayerStats
from sofim_optax.kbfgs import KbfgsCurvature, ScaleByKbfgsState, kbfgs, kbfgs_l, scale_by_kbfgs
from sofim_optax.kfac import KfacCurvature, ScaleByKfacState, kfac, scale_by_kfac
from sofim_optax.kpsvd import *  # noqa: F403  (the family's __all__)
from sofim_optax.kpsvd_curvature import KroneckerSvdCurvature
from sofim_optax.linalg import damped_kron_solve, sherman_morrison_solve
from sofim_optax.mini_block_fisher import (
    MiniBlockFisherCurvature,
    ScaleByMiniBlockFisherState,
    mbf,
    mini_block_fisher,
    scale_by_mini_block_fisher,
)
from sofim_optax.nystrom_sgd import ScaleByNystromSgdState, nystrom_sgd, scale_by_nystrom_sgd
from sofim_optax.partitioned_state import PartitionedState, partition_state
from sofim_optax.quadratic_model import QuadraticModelState, scale_by_quadratic_model
from sofim_optax.sofim import ScaleBySofimState, scale_by_sofim, sofim

__version__ = "0.1.0.dev0"

__all__ = [
    "__version__",
    "configure_cpu_runtime",
    "curvature",
    "distributed",
    "partition_state",
    "PartitionedState",
    "guards",
    "hyperparameters",
    "layerwise",
    "linalg",
    "LayerStats",
    "damped_kron_solve",
    "sherman_morrison_solve",
    # SOFIM
    "ScaleBySofimState",
    "scale_by_sofim",
    "sofim",
    # KFAC
    "KfacCurvature",
    "ScaleByKfacState",
    "scale_by_kfac",
    "kfac",
    # Mini-Block Fisher
    "MiniBlockFisherCurvature",
    "ScaleByMiniBlockFisherState",
    "scale_by_mini_block_fisher",
    "mini_block_fisher",
    "mbf",
    # The Kronecker-product-SVD family
    "KroneckerSvdCurvature",
    *kpsvd_module.__all__,
    # K-BFGS
    "KbfgsCurvature",
    "ScaleByKbfgsState",
    "scale_by_kbfgs",
    "kbfgs",
    "kbfgs_l",
    # The papers' baselines
    "ScaleByAdaHessianState",
    "scale_by_adahessian",
    "adahessian",
    "ScaleByNystromSgdState",
    "scale_by_nystrom_sgd",
    "nystrom_sgd",
    # The adaptive step (learning rate, momentum and damping from the quadratic model)
    "QuadraticModelState",
    "scale_by_quadratic_model",
    *(n for n in adaptive_module.__all__ if n.endswith("_adaptive")),
]
del kpsvd_module, adaptive_module  # only needed to build __all__
