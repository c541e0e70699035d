"""Progress bars with rate and ETA (rich), and one shared console for messages."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False, emoji=False)


def print_counts(title: str, table: dict[str, dict[str, int]], classes: list[str]) -> None:
    """Print a table of counts per class (rows) and part (columns), with totals."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("class")
    for part in table:
        t.add_column(part, justify="right")
    for c in classes:
        t.add_row(c, *[str(row[c]) for row in table.values()])
    t.add_row("[bold]total", *[f"[bold]{row['total']}" for row in table.values()])
    console.print(t)


def _ci(stat: dict | None, signed: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    f = "+.1f" if signed else ".1f"
    ends = "" if stat.get("ci_low") is None else f" [{100 * stat['ci_low']:{f}}, {100 * stat['ci_high']:{f}}]"
    return f"{100 * stat['mean']:{f}}{ends}"


def print_headline(report_folder: Path) -> None:
    """Print where a run's report is and its headline table: each budget's arms, test accuracy with
    its 95% CI, the paired gain over real, the label-equivalent."""
    from rich.table import Table

    results = json.loads((report_folder / "results.json").read_text(encoding="utf-8"))
    console.print(f"[bold green]report:[/] {report_folder / 'report.html'} (and report.md beside it)")
    for budget, r in results.get("budgets", {}).items():
        e = r.get("evaluation")
        if not e:
            continue
        t = Table(title=f"{results['experiment']}, {budget}: test accuracy (%), mean [95% CI] over seeds")
        for column in ("arm", "seeds", "accuracy", "gain vs real (points)", "label-equivalent"):
            t.add_column(column, justify="left" if column == "arm" else "right")
        seeds = e["n_seeds"] if isinstance(e["n_seeds"], dict) else {a: e["n_seeds"] for a in e["arms"]}
        for arm, stats in e["arms"].items():
            le = e.get("label_equivalent", {}).get(arm)
            t.add_row(arm, str(seeds.get(arm, "")), _ci(stats.get("accuracy")),
                      _ci(e["paired_gain_vs_real"].get(arm, {}).get("accuracy"), signed=True),
                      le["text"] if le else "")
        console.print(t)
    if results.get("note"):
        console.print(f"[yellow]{results['note']}[/]")


def warn(message: str) -> None:
    """Print a warning a user should read (no Python source line, unlike ``warnings.warn``)."""
    from rich.markup import escape

    console.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int, enabled: bool = True,
                 unit: str = "", completed: int = 0) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, **status)``; ``status`` key=values are shown after the bar.

    ``completed``: units done before this call (a resumed run); they count toward the bar but not
    toward the rate, so the ETA is that of the units left at this call's speed."""
    if not enabled:
        yield lambda n=1, **status: None
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    # Outside a terminal (CI logs, nohup) redraws would flood the log: print sparse lines instead.
    if not sys.stderr.isatty():
        yield _LineProgress(description, total, completed)
        return
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, completed=completed, status="")

        def advance(n: int = 1, **status: object) -> None:
            text = "  ".join(f"{k} {_fmt(v)}" for k, v in status.items())
            progress.update(task, advance=n, status=text)

        yield advance


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _LineProgress:
    """Plain-text progress for logs: a line at every 10% with rate and ETA."""

    def __init__(self, description: str, total: int, completed: int = 0):
        import time

        self._time = time.monotonic
        self.description, self.total = description, max(total, 1)
        self.done = self.resumed_at = completed
        self.start = self._time()
        self.next_mark = (int(completed * 10 / self.total) + 1) / 10

    def __call__(self, n: int = 1, **status: object) -> None:
        self.done += n
        frac = self.done / self.total
        if frac + 1e-9 < self.next_mark and self.done < self.total:
            return
        while self.next_mark <= frac + 1e-9:
            self.next_mark += 0.1
        elapsed = self._time() - self.start
        here = self.done - self.resumed_at  # done by this call: the rate
        eta = elapsed / here * (self.total - self.done) if here > 0 else 0.0
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in status.items())
        console.print(f"{self.description}: {self.done}/{self.total} ({frac:.0%}) "
                      f"elapsed {elapsed:.0f}s eta {eta:.0f}s {text}")
