"""kfac-jax's side of the KFAC benchmark: its pinned environment, the data export, the runner.

kfac-jax 0.0.8 needs jax 0.9.x, so it runs in a virtual environment of its own
(:func:`ensure_kfac_jax_venv`: ``kfac-jax==0.0.8 jax==0.9.0 jaxlib==0.9.0``) through the
script :mod:`experiments.benchmarks.kfac_jax_runner`, which reads a JSON config and the
exported data and parameters (:func:`export_npz`). ``train`` runs whole trainings
(:func:`run_kfac_jax_train`); ``serve`` times K steps on request (:class:`KfacJaxServer`), so
that kfac-jax's timing rounds interleave with ours.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.benchmarks.problems import EMA, INVERSE_PERIOD, L2_REG

__all__ = [
    "RUNNER",
    "KFAC_JAX_PINS",
    "default_kfac_jax_venv",
    "venv_python",
    "kfac_jax_venv_ready",
    "ensure_kfac_jax_venv",
    "runner_env",
    "export_npz",
    "runner_config",
    "run_kfac_jax_train",
    "KfacJaxServer",
]

RUNNER = Path(__file__).with_name("kfac_jax_runner.py")
KFAC_JAX_PINS = ("kfac-jax==0.0.8", "jax==0.9.0", "jaxlib==0.9.0")


def default_kfac_jax_venv() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "sofim_optax" / "kfac-jax-0.0.8-venv"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def kfac_jax_venv_ready(venv: Path) -> bool:
    py = venv_python(venv)
    if not py.exists():
        return False
    check = "import kfac_jax, jax; print(kfac_jax.__version__, jax.__version__)"
    r = subprocess.run([str(py), "-c", check], capture_output=True, text=True, env=runner_env())
    return r.returncode == 0


def ensure_kfac_jax_venv(venv: Path, log: Callable[[str], None] = print) -> Path:
    """Returns the venv's python, creating the pinned environment first if it does not import kfac_jax."""
    venv = Path(venv)
    if kfac_jax_venv_ready(venv):
        return venv_python(venv)
    log(f"creating the kfac-jax environment at {venv} ({' '.join(KFAC_JAX_PINS)}) ...")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(venv_python(venv)), "-m", "pip", "install", "--quiet", *KFAC_JAX_PINS], check=True
    )
    if not kfac_jax_venv_ready(venv):
        raise RuntimeError(f"{venv} was created but does not import kfac_jax")
    return venv_python(venv)


def runner_env() -> dict[str, str]:
    """The runner's environment: ours, minus the variables that point at our own venv."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    # Same LAPACK threading as in this process (sofim_optax defaults it to 1 at import).
    if "OPENBLAS_NUM_THREADS" in os.environ:
        env["OPENBLAS_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"]
    return env


def export_npz(path: Path, x_train: np.ndarray, params: Mapping[str, Any]) -> None:
    """Writes ``x_train`` and the autoencoder's parameters as ``w{i}``/``b{i}`` (``Dense_i``)."""
    arrays = {"x_train": np.asarray(x_train, np.float32)}
    n = len([k for k in params if k.startswith("Dense_")])
    for i in range(n):
        arrays[f"w{i}"] = np.asarray(params[f"Dense_{i}"]["kernel"], np.float32)
        arrays[f"b{i}"] = np.asarray(params[f"Dense_{i}"]["bias"], np.float32)
    np.savez(path, **arrays)


def runner_config(
    runs: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    seed: int,
    log_every: int = 10,
    eval_examples: int = 10000,
    eval: bool = True,
    warmup_steps: int | None = None,
) -> dict[str, Any]:
    cfg = {
        "batch_size": batch_size,
        "l2_reg": L2_REG,
        "ema": EMA,
        "inverse_period": INVERSE_PERIOD,
        "estimation_mode": "fisher_gradients",
        "seed": seed,
        "log_every": log_every,
        "eval_examples": eval_examples,
        "eval": eval,
        "runs": [dict(r) for r in runs],
    }
    if warmup_steps is not None:
        cfg["warmup_steps"] = warmup_steps
    return cfg


def run_kfac_jax_train(
    python: Path,
    workdir: Path,
    data: Path,
    config: Mapping[str, Any],
    tag: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    cfg_path, out_path = workdir / f"{tag}_config.json", workdir / f"{tag}_out.json"
    cfg_path.write_text(json.dumps(config))
    proc = subprocess.Popen(
        [str(python), str(RUNNER), "train", str(cfg_path), str(data), str(out_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=runner_env(),
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        log(f"  kfac-jax: {line.strip()}")
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0:
        raise RuntimeError(f"kfac-jax runner failed:\n{err[-4000:]}")
    return json.loads(out_path.read_text())


class KfacJaxServer:
    """``kfac_jax_runner.py serve``: times K kfac-jax steps on request (interleaved rounds)."""

    def __init__(self, python: Path, workdir: Path, data: Path, config: Mapping[str, Any]):
        cfg_path = workdir / "serve_config.json"
        cfg_path.write_text(json.dumps(config))
        self.stderr = open(workdir / "serve_stderr.txt", "w")
        self.proc = subprocess.Popen(
            [str(python), str(RUNNER), "serve", str(cfg_path), str(data)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=runner_env(),
        )
        self.ready = self._read()
        if not self.ready.get("ready"):
            raise RuntimeError(f"kfac-jax server did not start: {self.ready}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.flush()
            raise RuntimeError(f"kfac-jax server exited (see {self.stderr.name})")
        return json.loads(line)

    def time_steps(self, name: str, steps: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"name": name, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._read()["seconds"] / steps

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()
