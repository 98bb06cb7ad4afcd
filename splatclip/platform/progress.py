"""A running job's progress for whoever watches it: the job says how much of its work is done as it
goes, and `Meter` turns that into the rate and the time left. Every update is a DEBUG record of the
logger `splatclip.progress` (a terminal that draws one updating line listens at DEBUG, as the demo
does); one in `every` seconds, and the last, is an INFO line for the job's log."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("splatclip.progress")


def pace(done: float, total: float, first: float, seconds: float) -> tuple[float, float | None]:
    """(units per second, seconds left): the rate of the work done since `first` (what was done
    before this process started, e.g. by a run it resumes), and the rest at that rate (None before
    any work is done)."""
    rate = (done - first) / seconds if seconds > 0 else 0.0
    return rate, (max(total - done, 0) / rate if rate > 0 else None)


def clock(seconds: float | None) -> str:
    """12 s, 3 min 05 s, 1 h 02 min; '?' for None."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Meter:
    """The progress of one job's work in `unit`s (steps, shards) out of `total`."""

    def __init__(self, job: str, unit: str, total: int, every: float = 10.0):
        self.job, self.unit, self.total, self.every = job, unit, total, every
        self.start = time.perf_counter()
        self.last = self.start
        self.first: float | None = None  # what was done when the first update came

    def update(self, done: float, note: str = "", total: int | None = None) -> str:
        """Record `done` units (and a new `total`, when the job learns it); returns the line."""
        now = time.perf_counter()
        self.total = total if total is not None else self.total
        if self.first is None:
            self.first, self.start = done, now
        rate, left = pace(done, self.total, self.first, now - self.start)
        line = (f"{self.job}: {done:.0f} of {self.total} {self.unit}, {rate:.2f} {self.unit}/s, "
                f"{clock(left)} left" + (f"; {note}" if note else ""))
        finished = done >= self.total
        due = finished or now - self.last >= self.every
        log.log(logging.INFO if due else logging.DEBUG, line,
                extra={"progress": {"job": self.job, "done": done, "total": self.total, "unit": self.unit,
                                    "rate": rate, "left": left, "note": note}})
        if due:
            self.last = now
        return line
