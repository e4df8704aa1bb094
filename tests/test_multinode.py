"""Two nodes simulated as two torchrun launchers on 127.0.0.1 (c10d rendezvous, one gloo process
each): they give the losses of one process, and after one node's launcher is killed mid-run,
`--resume` on both nodes continues exactly as the run that was never stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tinylm.train.checkpoint import latest_checkpoint
from tinylm.train.report import read_metrics

pytestmark = pytest.mark.slow

CONFIG = """\
model: {family: llama, n_layers: 1, n_heads: 2, d_model: 32, max_seq_len: 32}
train: {max_steps: 80, batch_tokens: 256, micro_batch: 8, warmup_steps: 2, lr: 3.0e-3,
        eval_every: 40, save_every: 10, log_every: 1, eval_tokens: 1024, device: cpu}
data: {seq_len: 32, val_fraction: 0.1, cache_dir: CACHE}
"""
WAIT_S = 300  # the most any launcher may take; a hang fails the test instead of blocking CI


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run: Path, key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run / "metrics.jsonl") if key in r]


class Nodes:
    """Two torchrun launchers, each in its own process group (as on two machines), logging
    to files; every process they started is killed on exit."""

    def __init__(self, args: list[str], logs: Path) -> None:
        port, run_id = _free_port(), uuid.uuid4().hex[:8]
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.procs: list[subprocess.Popen] = []
        for node in range(2):
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                       "--nproc_per_node=1", "--rdzv_backend=c10d", "--max_restarts=0",
                       f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={run_id}",
                       "-m", "tinylm", *args]
            with open(logs / f"node{node}.log", "w") as log:
                self.procs.append(subprocess.Popen(command, env=_env(), stdout=log,
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def output(self) -> str:
        """Both launchers' logs, for assertion messages."""
        return "\n".join(f"--- node {n}\n" + (self.logs / f"node{n}.log").read_text()
                         for n in range(2))

    def wait(self) -> list[int]:
        """The exit codes of both launchers (each bounded by WAIT_S)."""
        return [p.wait(timeout=WAIT_S) for p in self.procs]

    def signal_node(self, node: int, sig: int) -> None:
        """Send `sig` to the launcher of `node` and the workers it started."""
        os.killpg(self.procs[node].pid, sig)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=WAIT_S)


@contextmanager
def nodes(args: list[str], logs: Path) -> Iterator[Nodes]:
    """`Nodes` running `tinylm ARGS`, cleaned up however the test ends."""
    started = Nodes(args, logs)
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shakespeare_text: str) -> dict[str, object]:
    """The arguments of a tiny run, its one-process losses and its uninterrupted two-node run."""
    root = tmp_path_factory.mktemp("multinode")
    data = root / "shakes.txt"
    data.write_text(shakespeare_text[:20_000], encoding="utf-8")
    config = root / "config.yaml"
    config.write_text(CONFIG.replace("CACHE", str(root / "cache")), encoding="utf-8")
    args = ["pretrain", "-c", str(config), "-d", str(data), "-t", "bytes", "-q"]
    one = root / "one"  # also fills the token cache, so the nodes do not encode at once
    subprocess.run([sys.executable, "-m", "tinylm", *args, "-o", str(one)], env=_env(),
                   check=True, timeout=WAIT_S)
    two = root / "two"
    with nodes([*args, "-o", str(two)], root / "logs-two") as both:
        assert both.wait() == [0, 0], both.output()
    return {"root": root, "args": args, "one": one, "two": two}


def test_two_nodes_give_the_losses_of_one_process(runs: dict) -> None:
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert [s for s, _ in two] == list(range(1, 81))
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)
    assert [v for _, v in _losses(runs["two"], "val_loss")] == pytest.approx(
        [v for _, v in _losses(runs["one"], "val_loss")], rel=1e-5)
    assert latest_checkpoint(runs["two"]).name == "step_0000080"


@pytest.mark.parametrize(("node", "sig"), [(1, signal.SIGKILL), (0, signal.SIGTERM)],
                         ids=["sigkill-node1", "sigterm-node0"])
def test_resume_on_both_nodes_after_one_is_killed_is_exact(runs: dict, node: int,
                                                            sig: int) -> None:
    """Kill one launcher's process group once a checkpoint is written and steps are logged
    past it; the other node stops on its own (its peer is gone); then both resume."""
    cut = runs["root"] / f"cut-{node}-{sig}"
    args = [*runs["args"], "-o", str(cut)]
    with nodes(args, cut.parent / f"logs-{cut.name}") as both:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and all(p.poll() is None for p in both.procs):
            ckpt = latest_checkpoint(cut) if cut.is_dir() else None
            steps = [s for s, _ in _losses(cut)] if ckpt else []
            if ckpt and steps and steps[-1] >= int(ckpt.name.split("_")[1]) + 2:
                both.signal_node(node, sig)
                break
            time.sleep(0.01)
        codes = both.wait()  # the surviving node must exit too, not hang
        assert all(code != 0 for code in codes), both.output()
    assert len(_losses(cut)) < 80, "the run finished before it could be killed"
    with nodes([*args, "--resume"], cut.parent / f"logs-{cut.name}-resume") as both:
        assert both.wait() == [0, 0], both.output()
    assert _losses(cut) == _losses(runs["two"])
    assert _losses(cut, "val_loss") == _losses(runs["two"], "val_loss")
