"""Progress bars and console output shared by every stage (rich, with rates and ETA).

In a terminal the bars redraw in place.  When output goes to a log (CI, ``nohup``, a pipe) a bar cannot redraw, so
``progress()`` prints one plain line per task at most every ``log_every`` seconds instead, and one when it finishes.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# soft_wrap: log lines stay whole (greppable) when stderr is not a terminal
console = Console(stderr=True, soft_wrap=True)


class LoggedProgress(Progress):
    """A rich ``Progress`` that also works in logs: periodic plain lines when the console is not a terminal."""

    def __init__(self, *columns: Any, log_every: float = 15.0, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.log_every = log_every
        self._logged: dict[TaskID, float] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        if self.console.is_terminal:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        done = task.total is not None and task.completed >= task.total
        last = self._logged.setdefault(task_id, now)
        if done or now - last >= self.log_every:
            self._logged[task_id] = now if not done else float("inf")
            if last == float("inf"):
                return
            total = f"/{task.total:,.0f}" if task.total is not None else ""
            eta = task.time_remaining
            extra = task.fields.get("rate", "")
            self.console.print(
                f"  {task.description}: {task.completed:,.0f}{total}"
                + (f" ({100 * task.completed / task.total:.0f}%)" if task.total else "")
                + (f" {extra}" if extra else "")
                + f", {task.elapsed or 0:.0f}s elapsed" + (f", eta {eta:.0f}s" if eta and not done else ""),
                highlight=False,
            )


def progress(unit: str = "it") -> Progress:
    """A progress display with count, rate and ETA columns; use as a context manager."""
    return LoggedProgress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}", style="green"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def rate_text(count: float, seconds: float, unit: str) -> str:
    if seconds <= 0:
        return ""
    r = count / seconds
    return f"{r/1000:,.1f}k {unit}/s" if r >= 10_000 else f"{r:,.1f} {unit}/s"
