r"""How well do KFAC and the KPSVD family approximate a layer's exact Fisher block during training?

The approximation-quality study of Koroko et al. (arXiv 2201.10285, the paper's Fisher
figures): train the deep autoencoder on Fashion-MNIST and,
every ``--every`` iterations, for each selected layer form the **exact** minibatch Fisher block

.. math::

    F = \frac1N \sum_n (\bar a_n \bar a_n^\top) \otimes (g_n g_n^\top)

(``ā_n`` the layer's input with the bias coordinate last, ``g_n`` the per-example
pre-activation gradient, both from ``LayerStats`` captured by
``sofim_optax.curvature.linen.value_grad_and_stats``; sampled Fisher by default, as the paper)
and report the relative Frobenius error ``‖F − F̂‖_F / ‖F‖_F`` of

* **KFAC**: ``A ⊗ G``, ``A = mean āāᵀ``, ``G = mean ggᵀ``;
* **KPSVD**: ``R ⊗ S``, the nearest Kronecker product (power SVD, rank 1);
* **Deflation**: ``R1 ⊗ S1 + R2 ⊗ S2`` by deflated power SVD (rank 2);
* **KFAC-corrected**: ``A ⊗ G + R ⊗ S`` with ``R ⊗ S`` the nearest Kronecker product to
  ``F − A ⊗ G``;
* **Lanczos**: ``R1 ⊗ S1 + R2 ⊗ S2`` by restarted Golub–Kahan–Lanczos (rank 2);

all computed matrix-free by :func:`sofim_optax.linalg.nearest_kronecker` exactly as the
optimizers compute their minibatch factors (float32, ``--tol``, ``--max-iters``). As in the
paper's study the factors are per-minibatch (no EMA). Two references come from the SVD of the
explicit rearrangement ``𝓡(F)`` (numpy, float64): the best rank-1 and rank-2 errors
``sqrt(Σ_{k>r} σ_k²) / sqrt(Σ_k σ_k²)``; KPSVD should sit on the first and Deflation/Lanczos
on the second (a gap means the iterative solver stopped early).

**Sub-blocks.** ``F`` has ``(d_a d_g)²`` entries, too many for most layers. When
``d_a·d_g > --max-block``, a principal sub-block is used: a random subset ``I`` of the layer's
input coordinates (the bias coordinate always included) and ``O`` of its output units, sized so
that ``|I|·|O| ≤ --max-block``, fixed for the whole run. The sub-block of ``F`` is itself
``mean (ā_{n,I} ā_{n,I}ᵀ) ⊗ (g_{n,O} g_{n,O}ᵀ)``, so ``--fit block`` (default) fits every
approximation to the sub-block (the question "how Kronecker-like is this Fisher block" on a
smaller block); ``--fit layer`` fits the factors on the whole layer (what the optimizer uses,
matrix-free) and restricts them, ``R_{II} ⊗ S_{OO}`` (KFAC's restricted factors are the same
either way).

Training: Adam (lr ``--lr``, the paper's choice for this study) or our KFAC
(``--train-optimizer kfac``) on the autoencoder's sigmoid cross-entropy summed over pixels
(registered for the sampled Fisher; L2 ``½·1e-5·Σ‖W‖²`` as in ``experiments.benchmarks.kfac``).

Outputs under ``--out``: ``results.json`` (every error at every evaluated iteration, block
index sets, solver iterations), ``table.md`` (mean and last error per layer and method) and
``fisher_errors.png`` (error against iteration, one panel per layer).

Example (about 10 minutes on a loaded 2-core CPU)::

    python -m experiments.fisher_approximation --steps 300 --every 10 --out runs/fisher_approximation
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sofim_optax
from experiments import datasets, harness, reporting
from experiments.benchmarks.curves import jsonable
from experiments.benchmarks.kfac_jax_runner import batch_indices
from experiments.benchmarks.problems import autoencoder_problem, jitted_step, layer_widths
from experiments.registry import OPTIMIZERS
from sofim_optax import layerwise, linalg
from sofim_optax.curvature import linen as curvature_linen

__all__ = [
    "METHODS",
    "exact_block",
    "kron_sum",
    "relative_error",
    "optimal_errors",
    "approximations",
    "block_errors",
    "select_block",
    "main",
]

#: Approximations compared, in plotting order.
METHODS = ("KFAC", "KPSVD", "Deflation", "KFAC-corrected", "Lanczos")
#: SVD-of-𝓡(F) references (the best achievable rank-1 / rank-2 errors).
OPTIMA = ("optimal rank 1", "optimal rank 2")
COLORS = {
    "KFAC": "tab:red",
    "KPSVD": "tab:green",
    "Deflation": "tab:purple",
    "KFAC-corrected": "tab:blue",
    "Lanczos": "black",
    "optimal rank 1": "0.5",
    "optimal rank 2": "0.7",
}


# --------------------------------------------------------------------------------------
# The computations (numpy float64 for everything explicit)
# --------------------------------------------------------------------------------------


def exact_block(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``F = mean_n (a_n a_nᵀ) ⊗ (g_n g_nᵀ)`` formed explicitly in float64, shape ``(d_a d_g)²``.

    ``(a_n a_nᵀ) ⊗ (g_n g_nᵀ) = (a_n ⊗ g_n)(a_n ⊗ g_n)ᵀ``, so ``F = XᵀX / N`` with rows
    ``X_n = a_n ⊗ g_n`` (``np.kron`` order).
    """
    a = np.asarray(a, np.float64)
    g = np.asarray(g, np.float64)
    x = (a[:, :, None] * g[:, None, :]).reshape(a.shape[0], -1)
    return x.T @ x / a.shape[0]


def kron_sum(pairs: Sequence[tuple[Any, Any]]) -> np.ndarray:
    """``Σ_k R_k ⊗ S_k`` explicitly (float64)."""
    return sum(np.kron(np.asarray(r, np.float64), np.asarray(s, np.float64)) for r, s in pairs)


def relative_error(F: np.ndarray, pairs: Sequence[tuple[Any, Any]]) -> float:
    """``‖F − Σ_k R_k ⊗ S_k‖_F / ‖F‖_F`` (``nan`` when ``F = 0``)."""
    norm = np.linalg.norm(F)
    return float(np.linalg.norm(F - kron_sum(pairs)) / norm) if norm > 0 else math.nan


def optimal_errors(
    F: np.ndarray, d_a: int, d_g: int, ranks: Sequence[int] = (1, 2)
) -> dict[int, float]:
    """Best rank-``r`` Kronecker-sum errors, from the SVD of explicit ``𝓡(F)`` (Van Loan–Pitsianis)."""
    s = np.linalg.svd(np.asarray(linalg.rearrange(F, d_a, d_g), np.float64), compute_uv=False)
    total = np.sum(s**2)
    return {
        r: float(np.sqrt(max(np.sum(s[r:] ** 2), 0.0) / total)) if total > 0 else math.nan
        for r in ranks
    }


@partial(jax.jit, static_argnames=("max_iters", "krylov_dim"))
def approximations(
    a: jax.Array, g: jax.Array, tol: float = 1e-6, max_iters: int = 1000, krylov_dim: int = 4
) -> tuple[dict[str, list[tuple[jax.Array, jax.Array]]], dict[str, jax.Array]]:
    """The Kronecker factors of every method in :data:`METHODS` for samples ``a (N, d_a)``, ``g (N, d_g)``.

    Per-minibatch factors (no EMA), default PSD starts, computed as the optimizers do
    (:func:`sofim_optax.linalg.nearest_kronecker`). Returns ``({method: [(R, S), …]},
    {method: solver iterations})``.
    """
    n = a.shape[0]
    A = a.T @ a / n
    G = g.T @ g / n
    kpsvd, i1 = linalg.nearest_kronecker(a, g, 1, "power", tol, max_iters, return_info=True)
    defl, i2 = linalg.nearest_kronecker(a, g, 2, "power", tol, max_iters, return_info=True)
    corr, i3 = linalg.nearest_kronecker(
        a, g, 1, "power", tol, max_iters, subtract=(A, G), return_info=True
    )
    lanc, i4 = linalg.nearest_kronecker(
        a, g, 2, "lanczos", tol, max_iters, krylov_dim=krylov_dim, return_info=True
    )
    pairs = {
        "KFAC": [(A, G)],
        "KPSVD": kpsvd,
        "Deflation": defl,
        "KFAC-corrected": [(A, G)] + corr,
        "Lanczos": lanc,
    }
    iters = {
        "KPSVD": i1["iterations"],
        "Deflation": i2["iterations"],
        "KFAC-corrected": i3["iterations"],
        "Lanczos": i4["iterations"],
    }
    return pairs, iters


def block_errors(
    a: Any,
    g: Any,
    idx_a: np.ndarray | None = None,
    idx_g: np.ndarray | None = None,
    fit: str = "block",
    tol: float = 1e-6,
    max_iters: int = 1000,
    krylov_dim: int = 4,
    optima: bool = True,
) -> dict[str, Any]:
    """Relative Frobenius errors of every method on the (sub-)block ``(idx_a, idx_g)`` of a layer's F.

    ``a (N, d_a)`` homogeneous inputs, ``g (N, d_g)`` output gradients; ``idx_*`` index sets
    (``None``: all). ``fit="block"`` fits the approximations to the sub-block's own samples,
    ``fit="layer"`` fits them to the whole layer and restricts the factors. Returns
    ``{"errors": {name: float}, "iterations": {method: [int, …]}}``, the names being
    :data:`METHODS` (and :data:`OPTIMA` when ``optima``).
    """
    if fit not in ("block", "layer"):
        raise ValueError(f"fit must be 'block' or 'layer', got {fit!r}")
    a = np.asarray(a)
    g = np.asarray(g)
    ia = np.arange(a.shape[1]) if idx_a is None else np.asarray(idx_a)
    ig = np.arange(g.shape[1]) if idx_g is None else np.asarray(idx_g)
    a_b, g_b = a[:, ia], g[:, ig]
    F = exact_block(a_b, g_b)
    if fit == "block":
        pairs, iters = approximations(
            jnp.asarray(a_b), jnp.asarray(g_b), tol, max_iters, krylov_dim
        )
    else:
        pairs, iters = approximations(jnp.asarray(a), jnp.asarray(g), tol, max_iters, krylov_dim)
        pairs = {
            m: [(np.asarray(r)[np.ix_(ia, ia)], np.asarray(s)[np.ix_(ig, ig)]) for r, s in ps]
            for m, ps in pairs.items()
        }
    errors = {m: relative_error(F, pairs[m]) for m in METHODS}
    if optima:
        best = optimal_errors(F, len(ia), len(ig))
        errors["optimal rank 1"], errors["optimal rank 2"] = best[1], best[2]
    return {"errors": errors, "iterations": {m: np.asarray(v).tolist() for m, v in iters.items()}}


def select_block(
    d_a: int, d_g: int, max_block: int, rng: np.random.Generator, bias: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Index sets ``(I, O)`` with ``|I|·|O| ≤ max_block``: everything when the layer fits, else a
    random subset (sorted; the bias coordinate ``d_a − 1`` always in ``I`` when ``bias``),
    about square, then widened on the side that still has room."""
    if d_a * d_g <= max_block:
        return np.arange(d_a), np.arange(d_g)
    side = max(1, int(math.isqrt(max_block)))
    n_a = min(d_a, side)
    n_g = min(d_g, max(1, max_block // n_a))
    n_a = min(d_a, max(1, max_block // n_g))
    if bias:
        rest = rng.choice(d_a - 1, size=n_a - 1, replace=False) if n_a > 1 else np.zeros(0, int)
        ia = np.sort(np.concatenate([rest, [d_a - 1]]))
    else:
        ia = np.sort(rng.choice(d_a, size=n_a, replace=False))
    ig = np.sort(rng.choice(d_g, size=n_g, replace=False))
    return ia.astype(int), ig.astype(int)


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def summary_table(res: Mapping[str, Any]) -> str:
    names = list(METHODS) + (list(OPTIMA) if res["args"]["optima"] else [])
    head = "| layer | block (d_a'×d_g' of d_a×d_g) | " + " | ".join(names) + " |"
    lines = [
        f"Relative Frobenius error ‖F − F̂‖/‖F‖, mean over {len(res['iterations'])} evaluations "
        f"(iterations {res['iterations'][0]}–{res['iterations'][-1]}), last evaluation in parentheses; "
        f"fit = {res['args']['fit']}, Fisher = {res['args']['fisher']}.\n",
        head,
        "|---|---|" + "---:|" * len(names),
    ]
    for layer, r in res["layers"].items():
        cells = []
        for m in names:
            e = np.asarray(r["errors"][m], np.float64)
            cells.append(f"{np.nanmean(e):.3f} ({e[-1]:.3f})")
        block = f"{len(r['idx_a'])}×{len(r['idx_g'])} of {r['d_a']}×{r['d_g']}"
        lines.append(f"| {layer} | {block} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Mean solver iterations (power: per term; Lanczos: restarted passes): "
        + "; ".join(
            f"{layer}: " + ", ".join(f"{m} {np.mean(v):.0f}" for m, v in r["iterations"].items())
            for layer, r in res["layers"].items()
        )
    )
    return "\n".join(lines)


def plot(res: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(res["layers"])
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    names = list(METHODS) + (list(OPTIMA) if res["args"]["optima"] else [])
    for ax, layer in zip(axes.flat, layers):
        r = res["layers"][layer]
        for m in names:
            style = ":" if m in OPTIMA else ("--" if m in ("Deflation",) else "-")
            ax.plot(res["iterations"], r["errors"][m], style, color=COLORS[m], label=m, lw=1.2)
        ax.set_title(
            f"{layer} ({len(r['idx_a'])}×{len(r['idx_g'])} of {r['d_a']}×{r['d_g']})", fontsize=9
        )
        ax.set_xlabel("iteration")
        ax.set_ylabel("‖F − F̂‖ / ‖F‖")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        f"Fisher block approximation error during training ({res['args']['train_optimizer']}, "
        f"{res['args']['fisher']} Fisher, fit={res['args']['fit']})",
        fontsize=10,
    )
    reporting.save_figure(fig, path)


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = harness.script_parser(__doc__)
    p.add_argument("--out", default="runs/fisher_approximation")
    p.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST folder (default: the loader's lookup)"
    )
    p.add_argument(
        "--encoder",
        type=layer_widths,
        default=(1000, 500, 250, 30),
        help="encoder widths, e.g. 256,64,16",
    )
    p.add_argument(
        "--train-examples", type=int, default=None, help="use only the first N training images"
    )
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--steps", type=int, default=300, help="training iterations")
    p.add_argument(
        "--every", type=int, default=10, help="evaluate the errors every K iterations (and at 0)"
    )
    p.add_argument(
        "--layers", default="all", help="comma-separated layer_stats keys (Dense_0, …) or 'all'"
    )
    p.add_argument(
        "--max-block", type=int, default=1600, help="largest d_a'·d_g' of an exact block"
    )
    p.add_argument("--fit", choices=("block", "layer"), default="block")
    p.add_argument("--fisher", choices=("sampled", "empirical"), default="sampled")
    p.add_argument("--train-optimizer", choices=("adam", "kfac"), default="adam")
    p.add_argument(
        "--lr", type=float, default=1e-3, help="Adam's learning rate (KFAC: 0.1, damping 100)"
    )
    p.add_argument(
        "--tol",
        type=float,
        default=1e-6,
        help="relative tolerance of the SVD solvers (paper: 1e-6)",
    )
    p.add_argument("--max-iters", type=int, default=1000, help="solver cap (paper: 1000)")
    p.add_argument(
        "--krylov-dim",
        type=int,
        default=4,
        help="Lanczos steps per pass (sofim_optax.kpsvd_lanczos default)",
    )
    p.add_argument(
        "--no-optima", dest="optima", action="store_false", help="skip the SVD-of-𝓡(F) references"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ds = datasets.to_float_arrays(
        datasets.load_fashion_mnist(args.data_dir, download=False), flatten=True
    )
    x_train = ds.x_train[: args.train_examples] if args.train_examples else ds.x_train
    problem = autoencoder_problem(args.batch_size, encoder=args.encoder, x=x_train, seed=args.seed)
    if args.train_optimizer == "adam":
        tx, fisher = optax.adam(args.lr), "empirical"
    else:
        tx, fisher = sofim_optax.kfac(learning_rate=0.1, damping=100.0), "sampled"
    step = jitted_step(
        problem, tx, needs=OPTIMIZERS[args.train_optimizer].needs, fisher=fisher, seed=args.seed
    )
    base_key = jax.random.PRNGKey(args.seed + 777)

    @jax.jit
    def stats_fn(params, x, i):
        _, _, stats = curvature_linen.value_grad_and_stats(
            problem.loss_fn, params, x, fisher=args.fisher, rng=jax.random.fold_in(base_key, i)
        )
        return stats

    params = jax.tree_util.tree_map(lambda t: jnp.array(t, copy=True), problem.params)
    state = tx.init(params)
    order = batch_indices(len(x_train), args.batch_size, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    res: dict[str, Any] = {
        "args": vars(args) | {"encoder": list(args.encoder)},
        "versions": {"jax": jax.__version__, "sofim_optax": sofim_optax.__version__},
        "device": f"{jax.default_backend()}, {os.cpu_count()} CPUs",
        "iterations": [],
        "losses": [],
        "layers": {},
    }
    print(
        f"autoencoder {args.encoder}, batch {args.batch_size}, {len(x_train)} images, {args.steps} steps, "
        f"errors every {args.every}",
        flush=True,
    )
    for i in range(args.steps + 1):
        x = jnp.asarray(x_train[next(order)])
        if i % args.every == 0 or i == args.steps:
            t0 = time.perf_counter()
            stats = stats_fn(params, x, np.int32(i))
            names = sorted(
                stats,
                key=lambda k: [int(t) if t.isdigit() else t for t in k.replace("_", " ").split()],
            )
            if args.layers != "all":
                wanted = [s.strip() for s in args.layers.split(",")]
                missing = set(wanted) - set(names)
                if missing:
                    raise SystemExit(f"unknown layers {sorted(missing)}; available: {names}")
                names = wanted
            for name in names:
                st = stats[name]
                has_bias = "bias" in params[name] if name in params else True
                a = np.asarray(layerwise.homogeneous_inputs(st.inputs, has_bias, jnp.float32))
                g = np.asarray(st.output_grads, np.float32)
                if name not in res["layers"]:
                    ia, ig = select_block(
                        a.shape[1], g.shape[1], args.max_block, rng, bias=has_bias
                    )
                    res["layers"][name] = {
                        "d_a": a.shape[1],
                        "d_g": g.shape[1],
                        "idx_a": ia.tolist(),
                        "idx_g": ig.tolist(),
                        "errors": {},
                        "iterations": {},
                    }
                lr = res["layers"][name]
                r = block_errors(
                    a,
                    g,
                    np.asarray(lr["idx_a"]),
                    np.asarray(lr["idx_g"]),
                    args.fit,
                    args.tol,
                    args.max_iters,
                    args.krylov_dim,
                    args.optima,
                )
                for m, e in r["errors"].items():
                    lr["errors"].setdefault(m, []).append(e)
                for m, it in r["iterations"].items():
                    lr["iterations"].setdefault(m, []).append(it)
            res["iterations"].append(i)
            last = {n: res["layers"][n]["errors"] for n in names}
            print(
                f"iter {i:5d} ({time.perf_counter() - t0:.1f} s): "
                + "; ".join(
                    f"{n} " + " ".join(f"{m[:5]}={e[m][-1]:.3f}" for m in METHODS)
                    for n, e in last.items()
                ),
                flush=True,
            )
        if i == args.steps:
            break
        params, state, loss = step(params, state, np.int32(i), x)
        res["losses"].append(float(loss))
    res["total_time_s"] = time.perf_counter() - t_start
    table = summary_table(res)
    print(table)
    (out / "results.json").write_text(json.dumps(jsonable(res), indent=1))
    cmd = "python -m experiments.fisher_approximation " + " ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for k, v in vars(args).items()
        if k not in ("out", "optima", "data_dir") and v is not None
    )
    (out / "table.md").write_text(f"# Fisher block approximation\n\n`{cmd}`\n\n{table}\n")
    plot(res, out / "fisher_errors.png")
    print(
        f"wrote {out}/results.json, table.md, fisher_errors.png in {res['total_time_s'] / 60:.1f} min",
        flush=True,
    )
    return res


if __name__ == "__main__":
    main()
