"""Per-epoch progress: a live bar on a terminal, one plain line per epoch everywhere else."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class EpochProgress:
    """Reports each finished epoch; redraws a bar only when stdout is a terminal, so logs stay one line per epoch."""

    def __init__(self, first: int, last: int) -> None:
        self.last = last
        console = Console()
        self.bar: Progress | None = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("epochs"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.bar.add_task("epochs", total=last, completed=first - 1)

    def __enter__(self) -> EpochProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, epoch: int, metrics: Mapping[str, float]) -> None:
        line = f"epoch {epoch}/{self.last} " + " ".join(f"{name}={value:.4g}" for name, value in metrics.items())
        if self.bar is None:
            print(line, flush=True)
        else:
            self.bar.console.print(line, markup=False)  # above the bar, which stays at the bottom
            self.bar.advance(self.task)
