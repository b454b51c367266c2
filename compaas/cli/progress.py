"""Live per-step progress bars for a job, fed by its event stream."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from compaas.types import JobEvent, JobRead
from engine.events import step_span


class JobProgress:
    """One bar for the job and one per step; a step's bar is the job's progress mapped back
    onto the step's share of it (engine.events.step_span), and full once the step succeeded."""

    def __init__(self, job: JobRead, console: Console) -> None:
        self.console = console
        self.steps = len(job.steps)
        self.live = console.is_terminal
        self.bars = Progress(
            TextColumn("{task.description:<14}"),
            BarColumn(bar_width=30),
            TaskProgressColumn(),
            TextColumn("{task.fields[state]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not self.live,
        )
        self.job_bar = self.bars.add_task(
            "overall", total=100, completed=round(job.progress * 100), state=job.status
        )
        self.step_bars: list[TaskID] = [
            self.bars.add_task(
                f"{step.index + 1}. {step.op}",
                total=100,
                completed=100 if step.status == "succeeded" else 0,
                state=step.status,
            )
            for step in job.steps
        ]
        self.running: int | None = job.current_step

    def __enter__(self) -> JobProgress:
        self.bars.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.bars.stop()

    def _say(self, text: str) -> None:
        if not self.live:  # a pipe or a log file: one line per change instead of bars
            self.console.print(text, markup=False, highlight=False)

    def __call__(self, event: JobEvent) -> None:
        data = event.data
        if event.type == "progress":
            progress = float(data.get("progress") or 0.0)
            message = str(data.get("message") or "")
            self.bars.update(self.job_bar, completed=progress * 100, state=message)
            if self.running is not None and 0 <= self.running < self.steps:
                lo, hi = step_span(self.running, self.steps)
                within = min(1.0, max(0.0, (progress - lo) / (hi - lo)))
                self.bars.update(self.step_bars[self.running], completed=within * 100)
        elif event.type == "step":
            index, status = int(data.get("index", -1)), str(data.get("status"))
            if not 0 <= index < self.steps:
                return
            state = status
            verdict = (data.get("quality") or {}).get("verdict")
            if verdict:
                state = f"{status} ({verdict})"
            if status == "running":
                self.running = index
                self.bars.update(self.step_bars[index], completed=0, state=state)
            elif status == "succeeded":
                self.bars.update(self.step_bars[index], completed=100, state=state)
            else:
                self.bars.update(self.step_bars[index], state=state)
            self._say(f"step {index + 1}/{self.steps} {self._op(index)}: {state}")
        elif event.type == "status":
            status = str(data.get("status"))
            self.bars.update(self.job_bar, state=status)
            if status == "succeeded":
                self.bars.update(self.job_bar, completed=100)
            self._say(f"job: {status}")

    def _op(self, index: int) -> str:
        return str(self.bars.tasks[self.step_bars[index]].description).split(". ", 1)[-1]
