"""Progress for a log file: when stderr is not a terminal (a batch job, `2> run.log`) there is no
progress bar, so a long run writes a plain line now and then instead."""

from __future__ import annotations

import sys
import time

LOG_SECONDS = 60.0  # how often a progress line is written


class ProgressLog:
    """Progress as plain lines for a log file (stderr is not a terminal, so no bar): one when the
    work is known, then one every LOG_SECONDS. The rate and time left go by residues when the
    total is known, else by rows (or records: `unit`)."""

    def __init__(self, verb: str, prefix: str = "", unit: str = "rows") -> None:
        self.verb, self.prefix, self.unit = verb, prefix, unit
        self.rows, self.residues, self.t0, self.last = 0, 0, 0.0, 0.0

    def start(self, rows: int, residues: int = 0) -> None:
        self.rows, self.residues = rows, residues
        self.t0 = self.last = time.perf_counter()
        if rows:
            self._say(f"{self.verb} {rows:,} {self.unit}" + (f" ({residues:,} residues)" if residues else ""))

    def update(self, rows_done: int, res_done: int = 0) -> None:
        now = time.perf_counter()
        if now - self.last < LOG_SECONDS or not self.rows:
            return
        self.last = now
        by_residues = bool(self.residues)
        done, total = (res_done, self.residues) if by_residues else (rows_done, self.rows)
        unit = "residues" if by_residues else self.unit
        rate = done / max(now - self.t0, 1e-9)
        left = (total - done) / rate if rate > 0 else float("inf")
        share = 100 * rows_done / self.rows
        rows = f"{rows_done:,}/{self.rows:,} {self.unit} ({share:.1f}%)"
        self._say(f"{rows}, {rate:,.0f} {unit}/s, {_eta(left)} left")

    def advance(self, rows_done: int, rows: int) -> None:
        """`start` on the first call, `update` after (a `progress(done, total)` callback)."""
        if not self.t0:
            self.start(rows)
        else:
            self.update(rows_done)

    def _say(self, text: str) -> None:
        print(f"{self.prefix}{text}", file=sys.stderr, flush=True)


def _eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown time"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
