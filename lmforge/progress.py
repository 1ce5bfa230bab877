"""Progress bars and console output shared by every stage (rich, with rates and ETA)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# soft_wrap: log lines stay whole (greppable) when stderr is not a terminal
console = Console(stderr=True, soft_wrap=True)


def progress(unit: str = "it") -> Progress:
    """A rich Progress with count, rate and ETA columns; use as a context manager."""
    return Progress(
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
    )


def rate_text(count: float, seconds: float, unit: str) -> str:
    if seconds <= 0:
        return ""
    r = count / seconds
    return f"{r/1000:,.1f}k {unit}/s" if r >= 10_000 else f"{r:,.1f} {unit}/s"
