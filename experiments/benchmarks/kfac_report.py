"""Tables and the figure of the KFAC benchmark (``python -m experiments.benchmarks.kfac``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from experiments.benchmarks.curves import fmt, loss_at_time, mean_last, smoothed
from experiments.benchmarks.kfac_cost import SGD_OLD_JAX

__all__ = ["LABELS", "targets_summary", "comparison_markdown", "plot_curves"]

LABELS = {
    "kfac_sampled": "sofim_optax KFAC (sampled Fisher)",
    "kfac_empirical": "sofim_optax KFAC (empirical Fisher)",
    "kfac_jax_fixed": "kfac-jax 0.0.8 (fixed lr/momentum/damping)",
    "kfac_jax_adaptive": "kfac-jax 0.0.8 (adaptive lr/momentum/damping)",
    "sgdm": "SGD-momentum",
    "adam": "Adam",
}


def targets_summary(results: Mapping[str, Any], our_inverse: str) -> list[str]:
    """Markdown lines: each target of the KFAC benchmark, the measured value, met or not."""
    lines = ["\n## Targets\n", "| target | measured | met |", "|---|---|---|"]
    yes = lambda ok: "yes" if ok else "**no**"
    for model, r in results.get("step_time", {}).items():
        for name, ratio in r["ratios"].items():
            if name.startswith("KFAC"):
                lines.append(
                    f"| KFAC step ≤ 2× SGD-momentum ({model}, {name}) | {ratio:.2f}× | {yes(ratio <= 2.0)} |"
                )
    ae = results.get("step_time", {}).get("autoencoder", {}).get("times", {})
    for fisher in ("sampled", "empirical"):
        ours = ae.get(f"KFAC ({our_inverse}, {fisher})")
        for other in ("kfac-jax fixed", "kfac-jax adaptive"):
            if ours and ae.get(other):
                ratio = ours / ae[other]
                norm = ""
                if ae.get(SGD_OLD_JAX) and ae.get("SGD-momentum"):
                    own = (ours / ae["SGD-momentum"]) / (ae[other] / ae[SGD_OLD_JAX])
                    norm = f" (each over its own jax's SGD-momentum: {own:.2f}×)"
                lines.append(
                    f"| per-step time below kfac-jax (ours {our_inverse}/{fisher} vs {other}) | "
                    f"{ratio:.2f}×{norm} | {yes(ratio < 1.0)} |"
                )
    cmp = results.get("kfac_jax")
    if cmp and cmp.get("equal_time_s"):
        t = cmp["equal_time_s"]
        m = cmp["methods"]
        for ours in ("kfac_sampled", "kfac_empirical"):
            for other in ("kfac_jax_fixed", "kfac_jax_adaptive"):
                if ours in m and other in m:
                    a, b = m[ours]["loss_at_equal_time"], m[other]["loss_at_equal_time"]
                    ok = np.isfinite(a) and (not np.isfinite(b) or a <= b)
                    lines.append(
                        f"| training loss at {t:.0f} s ≤ kfac-jax ({LABELS[ours]} vs {LABELS[other]}) | "
                        f"{fmt(a)} vs {fmt(b)} | {yes(ok)} |"
                    )
    return lines if len(lines) > 3 else []


def comparison_markdown(res, methods, ref_methods, k, say) -> list[str]:
    steps = res["steps"]
    md = [f"\n## Training side by side on Fashion-MNIST (autoencoder, batch 1000, {steps} steps)\n"]
    kfac_end = [res["methods"][m]["step_time"] * steps for m in methods]
    t_eq = min(kfac_end) if kfac_end else None
    res["equal_time_s"] = t_eq
    header = (
        "| method | hyperparameters (tuned) | ms per step (interleaved median) | ms per step (this run) | "
        f"loss after {steps} steps (mean of last {k}) | loss on 10k train images, end of run | "
        f"loss at {t_eq:.0f} s |"
        if t_eq
        else ""
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|"]
    for m in methods + ref_methods:
        r = res["methods"][m]
        hp = ", ".join(f"{a}={b:g}" for a, b in r["hparams"].items())
        at_steps = mean_last(r["losses"][:steps], k)
        at_time = loss_at_time(r["losses"], r["step_time"], t_eq, k) if t_eq else math.nan
        r["loss_at_steps"] = at_steps
        r["loss_at_equal_time"] = at_time
        label = LABELS[m] + (f" ({len(r['losses'])} steps)" if len(r["losses"]) != steps else "")
        interleaved = (
            f"{1e3 * r['step_time']:.0f}"
            if r["step_time_source"].startswith("interleaved")
            else "n/a"
        )
        lines.append(
            f"| {label} | {hp} | {interleaved} | {1e3 * r['mean_step_time']:.0f} | {fmt(at_steps)} | "
            f"{fmt(r.get('final_full_loss'))} | {fmt(at_time)} |"
        )
    table = "\n".join(lines)
    md.append(table)
    say(table)
    tune_lines = [
        "\n### Tuning grids (score = mean minibatch loss over the last "
        f"{k} of {res['tune_steps']} steps)\n",
        "| method | point | score |",
        "|---|---|---:|",
    ]
    for m, t in res["tuning"].items():
        for g in t["grid"]:
            mark = " **(chosen)**" if g["hparams"] == t["best"] else ""
            tune_lines.append(
                f"| {LABELS[m]} | {', '.join(f'{a}={b:g}' for a, b in g['hparams'].items())}{mark} "
                f"| {fmt(g['score'])} |"
            )
    md += tune_lines
    say("\n".join(tune_lines))
    return md


def plot_curves(res: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = res["select_last"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for m, r in res["methods"].items():
        sm = smoothed(r["losses"], k)
        steps = np.arange(1, len(sm) + 1)
        style = "-" if m.startswith("kfac") else "--"
        axes[0].plot(steps, sm, style, label=LABELS[m])
        axes[1].plot(steps * r["step_time"], sm, style, label=LABELS[m])
    for ax, xl in zip(axes, ("step", "wall time (s, steps × interleaved median step time)")):
        ax.set_xlabel(xl)
        ax.set_ylabel(f"training loss (mean of last {k} minibatches)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if res.get("equal_time_s"):
        axes[1].axvline(res["equal_time_s"], color="gray", lw=0.8)
        axes[1].set_xlim(0, 1.5 * res["equal_time_s"])
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Deep autoencoder on Fashion-MNIST, batch 1000: sofim_optax KFAC vs kfac-jax 0.0.8"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
