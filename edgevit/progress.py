"""Progress that reaches a log too.

On a terminal, rich's live bar. Anywhere else (a pipe, a file, a CI log) that bar is switched
off and a long stage would print nothing for minutes, so ``LogProgress`` prints plain lines
instead: one per item when a task has few (e.g. a pruned block), else one per ``step_pct``
percent, each with the elapsed time and the caller's ``info``. Both take the calls edgevit
makes on a rich ``Progress``: ``add_task``, ``update``, ``advance`` and use as a context."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

FEW = 20  # a task of at most this many items logs every item


@dataclass
class _Task:
    description: str
    total: float | None
    info: str = ""
    completed: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    logged_step: int = -1


class LogProgress:
    """Progress as log lines, for output that is not a terminal."""

    def __init__(self, console: Console, step_pct: float = 5.0) -> None:
        self.console = console
        self.step_pct = step_pct
        self.tasks: list[_Task] = []

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        self.tasks.append(_Task(description, total, str(fields.get("info", ""))))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               description: str | None = None, info: str | None = None, **_: Any) -> None:
        t = self.tasks[task_id]
        if description is not None:
            t.description = description
        if info is not None:
            t.info = info
        if completed is not None:
            t.completed = completed
        if advance:
            t.completed += advance
        if t.total and (advance or completed is not None):
            step = (int(t.completed) if t.total <= FEW
                    else int(100 * t.completed / t.total // self.step_pct))
            if step != t.logged_step:
                t.logged_step = step
                self._log(t)

    def _log(self, t: _Task) -> None:
        elapsed = time.perf_counter() - t.started
        done = f"{t.completed:g}/{t.total:g} ({100 * t.completed / t.total:.0f} %)" if t.total else f"{t.completed:g}"
        info = f"  {t.info}" if t.info else ""
        self.console.print(f"  {t.description}: {done}, {elapsed:.0f} s{info}", highlight=False, soft_wrap=True)


def make_progress(console: Console) -> Progress | LogProgress:
    """A live bar on a terminal, log lines elsewhere."""
    if not console.is_terminal:
        return LogProgress(console)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console, transient=False)
