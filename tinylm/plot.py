"""`tinylm plot`: the curves of several runs on one figure, for people who run no tracker.

Each run's metrics.jsonl gives the points; `tinylm.train.report.curves_figure` draws them (the
same drawing as every run's own loss_curve.png), against optimizer steps or tokens seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinylm.errors import TinyLMError
from tinylm.train.report import METRICS_FILE, curves_figure, read_metrics, save_figure

X_AXES = ("step", "tokens")


def read_runs(runs: list[str | Path]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label, metrics records) of each run directory; the label is the directory's name, or
    the path as given when two runs share a name."""
    if not runs:
        raise TinyLMError("no runs given", "name run directories: tinylm plot runs/a runs/b")
    read = []
    for run in runs:
        path = Path(run)
        if not path.is_dir():
            raise TinyLMError(f"{run}: no such run directory",
                              "give directories written by pretrain, finetune or dpo")
        records = read_metrics(path / METRICS_FILE)
        if not records:
            raise TinyLMError(f"{run}: no {METRICS_FILE} (or an empty one); not a training run?",
                              "give directories written by pretrain, finetune or dpo")
        read.append((path, records))
    names = [p.name for p, _ in read]
    return [(p.name if names.count(p.name) == 1 else str(p), r) for p, r in read]


def runs_figure(runs: list[str | Path], *, x: str = "step",
                metrics: tuple[str, ...] = ("loss", "val_loss")) -> Any:
    """The matplotlib figure of `metrics` against `x` for `runs` (checked: known axis, and
    each metric in at least one run)."""
    if x not in X_AXES:
        raise TinyLMError(f"--x {x!r}: unknown axis", f"use one of: {', '.join(X_AXES)}")
    if not metrics:
        raise TinyLMError("--metric: no metric given", "for example --metric loss,val_loss")
    series = read_runs(runs)
    seen = sorted({k for _, records in series for r in records for k in r} - {"step"})
    for metric in metrics:
        if metric not in seen:
            raise TinyLMError(f"--metric {metric}: in none of the runs' {METRICS_FILE}",
                              f"they have: {', '.join(seen)}")
    title = ", ".join(label for label, _ in series)
    return curves_figure(series, title if len(title) <= 80 else f"{len(series)} runs", x,
                         tuple(metrics))


def plot_runs(runs: list[str | Path], output: str | Path, *, x: str = "step",
              metrics: tuple[str, ...] = ("loss", "val_loss"), force: bool = False
              ) -> dict[str, Any]:
    """Draw `runs` into the PNG `output` (not over an existing file without `force`);
    what was drawn: the file, the runs' labels, the metrics and the axis."""
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise TinyLMError(f"-o {output}: tinylm plot writes a PNG", "name the file F.png")
    if output.exists() and not force:
        raise TinyLMError(f"{output}: already exists", "pass --force to overwrite")
    if not output.parent.is_dir():
        raise TinyLMError(f"{output.parent}: no such directory", "create it first")
    fig = runs_figure(runs, x=x, metrics=metrics)
    labels = [line.get_label() for line in fig.axes[0].lines]
    save_figure(fig, output)
    return {"output": str(output), "x": x, "metrics": list(metrics), "curves": labels}
