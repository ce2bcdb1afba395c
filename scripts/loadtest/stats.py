"""What a load test run records, and the figures made from it.

Samples are kept whole (a few hundred thousand floats at most) with the time they
were taken, so that any window of the run (a capacity step, the phase before and
during a reload storm) can be summarised afterwards. Percentiles interpolate
linearly between the closest ranks (numpy's default), so p50 of [1, 2, 3, 4] is 2.5.
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from scripts.loadtest.result import BudgetLine, ErrorExample, Finding, Summary, Turns
from scripts.measure import percentile

QUANTILES = tuple(range(101))
"""The points of each distribution kept in the JSON file (and drawn in the plot)."""
EXAMPLES = 20
"""Error and violation details kept per run: the counts are complete, the details not."""


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def summary(values: Sequence[float]) -> Summary:
    """``count``, ``p50``, ``p95``, ``p99``, ``max`` and ``mean`` of ``values``,
    rounded to 0.01; the figures are None when there are no values."""
    return Summary(
        count=len(values),
        p50=rounded(percentile(values, 50)),
        p95=rounded(percentile(values, 95)),
        p99=rounded(percentile(values, 99)),
        max=rounded(max(values)) if len(values) else None,
        mean=rounded(math.fsum(values) / len(values)) if len(values) else None,
    )


def quantiles(values: Sequence[float]) -> list[float]:
    """The 0th to 100th percentiles of ``values`` (empty when there are none)."""
    if len(values) == 0:
        return []
    points = np.percentile(np.asarray(values, dtype=np.float64), QUANTILES)
    return [round(float(p), 3) for p in points]


@dataclass
class Series:
    """Samples (milliseconds) with the run time (seconds) each was taken at."""

    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, at: float, value: float) -> None:
        """Add a sample; ``at`` never goes back (one clock, read as it is added)."""
        self.times.append(at)
        self.values.append(value)

    def between(self, start: float, end: float) -> list[float]:
        """The samples taken in [start, end)."""
        return self.values[bisect.bisect_left(self.times, start):
                           bisect.bisect_left(self.times, end)]

    def within(self, windows: Sequence[tuple[float, float]]) -> list[float]:
        """The samples taken in any of ``windows`` ([start, end) each)."""
        return [value for start, end in windows for value in self.between(start, end)]

    def __len__(self) -> int:
        return len(self.values)


@dataclass
class Recorder:
    """Everything the sessions of one run report; times are seconds since its start."""

    session_start_ms: Series = field(default_factory=Series)
    """From opening the WebSocket to ``session.characters.listed`` of the default set."""
    session_created_ms: Series = field(default_factory=Series)
    reload_ms: Series = field(default_factory=Series)
    reload_server_ms: Series = field(default_factory=Series)
    """The server's own ``duration_ms`` of each reload."""
    first_audio_ms: Series = field(default_factory=Series)
    frame_lateness_ms: Series = field(default_factory=Series)
    client_lag_ms: Series = field(default_factory=Series)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    error_times: list[float] = field(default_factory=list)
    error_examples: list[ErrorExample] = field(default_factory=list)
    violations: int = 0
    mismatches: int = 0
    violation_examples: list[Finding] = field(default_factory=list)
    mismatch_examples: list[Finding] = field(default_factory=list)
    responses: collections.Counter[str] = field(default_factory=collections.Counter)
    """``response.done`` by status: completed, cancelled (a barge-in), failed."""
    interruptions: int = 0
    """Interruptions of the cycle that started while the character's reply was going."""
    interruptions_missed: int = 0
    """Interruptions of the cycle that found no reply going (not begun yet, or over)."""
    talked_over: int = 0
    """Questions that started while a reply was still going (it came late)."""
    interrupted_at_ms: Series = field(default_factory=Series)
    """How much of the reply's audio had arrived when each interruption started."""
    turns: Turns = field(default_factory=Turns)
    stale_frames: int = 0
    """Reply audio that arrived outside its reply (after its ``response.done``, or for
    another response): not counted in the lateness."""
    compressed: int = 0
    uncompressed: int = 0
    """Sessions that opened with, and without, ``permessage-deflate``."""
    reloads_checked: int = 0
    sessions_open: int = 0
    sessions_opened: int = 0
    streaming: int = 0
    """Sessions streaming audio right now."""
    session_ids: set[str] = field(default_factory=set)

    def error(self, at: float, code: str, message: str = "", session_id: str = "") -> None:
        self.errors[code] += 1
        self.error_times.append(at)
        if len(self.error_examples) < EXAMPLES:
            self.error_examples.append(ErrorExample(round(at, 2), code, message[:300],
                                                    session_id))

    def errors_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.error_times if start <= t < end)

    def violation(self, details: Finding) -> None:
        self.violations += 1
        if len(self.violation_examples) < EXAMPLES:
            self.violation_examples.append(details)

    def mismatch(self, details: Finding) -> None:
        self.mismatches += 1
        if len(self.mismatch_examples) < EXAMPLES:
            self.mismatch_examples.append(details)


@dataclass(frozen=True)
class Budget:
    """One line of DESIGN.md §8 as this run measured it. ``ok`` is None when the run
    could not measure it (too small, or a remote server); it then fails nothing."""

    name: str
    value: float | None
    limit: float
    at_most: bool = True
    unit: str = "ms"
    note: str = ""
    binding: bool = True
    """False: shown for reference (measured under other conditions than the budget's)
    and never failing the run."""

    @property
    def ok(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def line(self) -> BudgetLine:
        """The budget as the result holds it."""
        return BudgetLine(self.name, self.value, self.limit, "<=" if self.at_most else ">=",
                          self.unit, self.ok, self.binding, self.note)


def passed(budgets: Sequence[Budget | BudgetLine]) -> bool:
    """Whether no binding budget was missed."""
    return all(budget.ok is not False for budget in budgets if budget.binding)
