"""What a run leaves to read: metrics.jsonl, the loss-curve PNG and report.md.

metrics.jsonl has one JSON object per line: training lines carry `loss` (and step, lr, tokens,
elapsed_s, tokens_per_s, grad_norm), evaluation lines carry `val_loss`, `val_bpb` and `eval_s`
(the seconds spent evaluating so far, so time-to-quality can leave evaluation out).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tinylm.console import format_value
from tinylm.errors import TinyLMError
from tinylm.nesting import loads_json
from tinylm.textio import atomic_write_text

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "loss_curve.png"
REPORT_FILE = "report.md"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a missing file has none). A last line cut short
    (a crash or a full disk in the middle of an append) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for n, line in lines:
        try:
            records.append(loads_json(line))
        except ValueError:
            if n == lines[-1][0] and not text.endswith("\n"):
                break
            raise TinyLMError(f"{path}:{n}: not a JSON record; the metrics log is damaged",
                              "remove the line") from None
    return records


class MetricsLog:
    """Appends records to RUN/metrics.jsonl, flushed line by line so a crash loses nothing;
    `trackers` (`tinylm.train.trackers`) get every record too."""

    def __init__(self, run_dir: Path, resume_step: int | None, trackers: Any = None) -> None:
        self.path, self.trackers = Path(run_dir) / METRICS_FILE, trackers
        # On resume, the lines a killed run wrote after its last checkpoint are replayed, so
        # they are dropped first; a fresh run starts an empty file.
        kept = []
        if resume_step is not None:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        """Append one record."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self) -> None:
        """Close the file and end the trackers' runs."""
        self._file.close()
        if self.trackers is not None:
            self.trackers.close()


def curves_figure(runs: list[tuple[str, list[dict[str, Any]]]], title: str, x: str = "step",
                  metrics: tuple[str, ...] = ("loss", "val_loss")) -> Any:
    """A matplotlib figure of `metrics` against `x` ("step" or "tokens") for each (label,
    records) run, one colour per run; the one place tinylm draws curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, records) in enumerate(runs):
        for metric in metrics:
            points = [(r[x], r[metric]) for r in records if metric in r and x in r]
            if not points:
                continue
            name = "train loss" if metric == "loss" else metric.replace("_", " ")
            style = {"marker": "o", "linestyle": "--"} if metric.startswith("val_") else \
                {"linewidth": 1}
            colour = {"color": colours[i % len(colours)]} if len(runs) > 1 else {}
            ax.plot([p for p, _ in points], [v for _, v in points],
                    label=f"{label}: {name}" if label else name, **style, **colour)
    ax.set_xlabel(x)
    # nats per token, except DPO: per pair
    ax.set_ylabel("loss" if all("loss" in m for m in metrics) else ", ".join(metrics))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: Path) -> None:
    """Write `fig` as a PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def plot_loss_curve(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training and validation loss against steps, as a PNG (written atomically)."""
    save_figure(curves_figure([("", records)], title), path)


def write_report(
    run_dir: Path, title: str, summary: dict[str, Any], records: list[dict[str, Any]],
    config: dict[str, Any],
) -> None:
    """report.md: the summary, the evaluations over time, the curve and the settings."""
    lines = [f"# {title}: {run_dir.name}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {format_value(value)} |" for key, value in summary.items()]
    evals = [r for r in records if "val_loss" in r]
    if evals:
        lines += ["", "## Evaluations", "", "| step | tokens | elapsed_s | val_loss | val_bpb |",
                  "|---:|---:|---:|---:|---:|"]
        for r in evals:
            cells = [r.get(k) for k in ("step", "tokens", "elapsed_s", "val_loss", "val_bpb")]
            lines.append("| " + " | ".join(format_value(c) for c in cells) + " |")
    lines += ["", f"![loss curve]({CURVE_FILE})", "", "## Settings", "", "```json",
              json.dumps(config, indent=2), "```", ""]
    atomic_write_text(run_dir / REPORT_FILE, "\n".join(lines))


def finish_report(
    run_dir: Path, title: str, summary: dict[str, Any], config: dict[str, Any]
) -> None:
    """Write the loss curve and report.md from the run's metrics.jsonl."""
    records = read_metrics(run_dir / METRICS_FILE)
    plot_loss_curve(records, run_dir / CURVE_FILE, f"{title}: {run_dir.name}")
    write_report(run_dir, title, summary, records, config)
