"""Two nodes simulated as two torchrun launchers on 127.0.0.1 (c10d rendezvous, one gloo process
each): they give the losses of one process, and after one node's launcher is killed mid-run,
`--resume` on both nodes continues exactly as the run that was never stopped. Also: the
signal rules that make a scheduler's stop clean on every node."""

from __future__ import annotations

import contextlib
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

# 8 sequences a step: 2 micro-batches of 4 on one process, 1 on each node. (Splitting one
# micro-batch of 8 is tests/test_batch_split.py's; here 80 steps would let the float rounding
# of different matmul shapes grow past a tight tolerance.)
CONFIG = """\
model: {family: llama, n_layers: 1, n_heads: 2, d_model: 32, max_seq_len: 32}
train: {max_steps: 80, batch_tokens: 256, micro_batch: 4, warmup_steps: 2, lr: 3.0e-3,
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


def _descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *_descendants(int(child))]
    return found


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
        """Send `sig` to every process of `node`, as a node's crash or a scheduler's stop does
        (Slurm signals each process of a job step): the workers first (torchrun starts them in
        sessions of their own), then the launcher's process group."""
        for pid in _descendants(self.procs[node].pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
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


@pytest.mark.slow
def test_two_nodes_give_the_losses_of_one_process(runs: dict) -> None:
    one, two = _losses(runs["one"]), _losses(runs["two"])
    assert [s for s, _ in two] == list(range(1, 81))
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)
    assert [v for _, v in _losses(runs["two"], "val_loss")] == pytest.approx(
        [v for _, v in _losses(runs["one"], "val_loss")], rel=1e-5)
    assert latest_checkpoint(runs["two"]).name == "step_0000080"


@pytest.mark.slow
@pytest.mark.parametrize(("node", "sig"), [(1, signal.SIGKILL), (0, signal.SIGTERM)],
                         ids=["node1-dies", "node0-stopped"])
def test_resume_on_both_nodes_after_one_is_killed_is_exact(runs: dict, node: int,
                                                            sig: int) -> None:
    """Once a checkpoint is written and steps are logged past it, node 1 dies (SIGKILL to all
    its processes: the other node fails at its next collective) or node 0 is stopped (SIGTERM
    to all its processes: both nodes finish the step and save it); then both resume."""
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
    if sig == signal.SIGTERM:  # a clean stop: the step it stopped at is saved
        assert latest_checkpoint(cut).name == f"step_{_losses(cut)[-1][0]:07d}", both.output()
    with nodes([*args, "--resume"], cut.parent / f"logs-{cut.name}-resume") as both:
        assert both.wait() == [0, 0], both.output()
    assert _losses(cut) == _losses(runs["two"])
    assert _losses(cut, "val_loss") == _losses(runs["two"], "val_loss")


def test_a_repeated_sigterm_still_stops_cleanly_and_a_second_ctrl_c_aborts() -> None:
    """Under Slurm a worker gets SIGTERM twice (the scheduler's, then torchrun's): both must
    leave the loop to finish its step and save; Ctrl-C, then Ctrl-C again, aborts."""
    from tinylm.train.loop import _catch_stop_signals

    with _catch_stop_signals() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # let the handler run
        assert flag == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    with _catch_stop_signals() as flag, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert flag == [signal.SIGINT]
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
