"""Per-step timing of the benchmarks: compilation and warm-up excluded, interleaved rounds.

Machines are noisy, so the benchmarks never report one time alone. Each contender is a
:class:`StepTimer` (a jitted step and the state it carries), compiled and warmed up when it
is made; :func:`interleaved_rounds` then times every contender once per round, in order
(the baseline first), and :func:`medians` / :func:`ratios` summarise the rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

__all__ = ["StepTimer", "call_timer", "interleaved_rounds", "medians", "ratios", "compare"]


class StepTimer:
    """Times ``carry = step(*carry)``; the first ``warmup_steps`` calls (compilation) are untimed.

    Attributes:
      carry: the state after the last call (read it to continue from there).
      warmup_seconds: how long the warm-up calls took.
    """

    def __init__(
        self, step: Callable[..., Sequence[Any]], carry: Sequence[Any], *, warmup_steps: int = 1
    ):
        self.step = step
        self.carry = tuple(carry)
        self.warmup_seconds = (
            self.seconds_per_step(warmup_steps) * warmup_steps if warmup_steps else 0.0
        )

    def seconds_per_step(self, steps: int) -> float:
        """Runs ``steps`` calls and returns the wall seconds per call (device work included)."""
        jax.block_until_ready(self.carry)
        start = time.perf_counter()
        for _ in range(steps):
            self.carry = tuple(self.step(*self.carry))
        jax.block_until_ready(self.carry)
        return (time.perf_counter() - start) / steps


def call_timer(fn: Callable[..., Any], args: Sequence[Any], *, warmup_steps: int = 1) -> StepTimer:
    """A :class:`StepTimer` of repeated ``fn(*args)`` calls on fixed ``args`` (waits for the result)."""
    args = tuple(args)
    return StepTimer(lambda _last: (fn(*args),), (None,), warmup_steps=warmup_steps)


def interleaved_rounds(
    contenders: Mapping[str, Callable[[], float]], *, rounds: int
) -> dict[str, list[float]]:
    """Calls every contender once per round, in order, ``rounds`` times; returns the samples."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            samples[name].append(run())
    return samples


def medians(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The median of each contender's samples."""
    return {name: statistics.median(values) for name, values in samples.items()}


def ratios(times: Mapping[str, float], baseline: str) -> dict[str, float]:
    """Each time divided by the baseline's."""
    return {name: t / times[baseline] for name, t in times.items()}


def compare(
    contenders: Mapping[str, Callable[[], float]], *, rounds: int, baseline: str
) -> dict[str, Any]:
    """Interleaved rounds of every contender, their medians and the ratios to ``baseline``:
    ``{"times", "ratios", "samples", "rounds"}``."""
    samples = interleaved_rounds(contenders, rounds=rounds)
    times = medians(samples)
    return {
        "times": times,
        "ratios": ratios(times, baseline),
        "samples": samples,
        "rounds": rounds,
    }
