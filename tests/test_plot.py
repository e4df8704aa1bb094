"""tinylm plot: several runs' curves on one figure; the lines hold the runs' metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tinylm.cli  # noqa: F401  (registers the commands)
from tinylm.cli.app import app
from tinylm.plot import runs_figure

runner = CliRunner()


def fake_run(path: Path, scale: float, steps: int = 6) -> Path:
    """A run directory whose metrics.jsonl has training lines every step and evaluations every
    third, as the loop writes them."""
    path.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": scale / step, "lr": 1e-3, "tokens": 256 * step})
        if step % 3 == 0:
            lines.append({"step": step, "val_loss": scale / step + 0.5, "val_bpb": 2.0,
                          "tokens": 256 * step})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def curves(fig) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in fig.axes[0].lines}


def test_each_run_and_metric_is_one_line_with_its_points(tmp_path: Path) -> None:
    a, b = fake_run(tmp_path / "a", 4.0), fake_run(tmp_path / "b", 8.0, steps=3)
    drawn = curves(runs_figure([a, b]))
    assert set(drawn) == {"a: train loss", "a: val loss", "b: train loss", "b: val loss"}
    assert drawn["a: train loss"] == ([1, 2, 3, 4, 5, 6], [4.0 / s for s in range(1, 7)])
    assert drawn["a: val loss"] == ([3, 6], [4.0 / 3 + 0.5, 4.0 / 6 + 0.5])
    assert drawn["b: train loss"] == ([1, 2, 3], [8.0, 4.0, 8.0 / 3])
    by_tokens = curves(runs_figure([a], x="tokens", metrics=("val_bpb",)))
    assert by_tokens == {"a: val bpb": ([768, 1536], [2.0, 2.0])}
    fig = runs_figure([a, b])
    colours = {line.get_label(): line.get_color() for line in fig.axes[0].lines}
    assert colours["a: train loss"] == colours["a: val loss"] != colours["b: train loss"]


def test_runs_with_the_same_name_are_labelled_by_path(tmp_path: Path) -> None:
    first, second = fake_run(tmp_path / "x" / "run", 1.0), fake_run(tmp_path / "y" / "run", 2.0)
    labels = set(curves(runs_figure([first, second], metrics=("loss",))))
    assert labels == {f"{first}: train loss", f"{second}: train loss"}


def test_cli_writes_the_png_and_reports_its_curves(tmp_path: Path) -> None:
    a, b = fake_run(tmp_path / "a", 4.0), fake_run(tmp_path / "b", 8.0)
    png = tmp_path / "plot.png"
    result = runner.invoke(app, ["plot", str(a), str(b), "-o", str(png), "--json"])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(result.output)
    assert report["curves"] == ["a: train loss", "a: val loss", "b: train loss", "b: val loss"]
    assert not list(tmp_path.glob(".plot.png.*"))  # no temporary file left
    again = runner.invoke(app, ["plot", str(a), "-o", str(png)])
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, ["plot", str(a), "-o", str(png), "--force", "-q"]).exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["MISSING"], "MISSING: no such run directory"),
    (["EMPTY"], "EMPTY: no metrics.jsonl"),
    (["A", "--metric", "reward"], "--metric reward: in none of the runs' metrics.jsonl (they "
                                         "have: loss, lr, tokens, val_bpb, val_loss)"),
    (["A", "--x", "time"], "--x 'time': unknown axis"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    a = fake_run(tmp_path / "A", 1.0)
    (tmp_path / "EMPTY").mkdir()
    names = {"A": str(a), "EMPTY": str(tmp_path / "EMPTY"), "MISSING": str(tmp_path / "MISSING")}
    png = tmp_path / "out.png"
    result = runner.invoke(app, ["plot", *[names.get(x, x) for x in args], "-o", str(png)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message.replace("MISSING", names["MISSING"]).replace("EMPTY", names["EMPTY"]) \
        in lines[0]
    assert not png.exists()
