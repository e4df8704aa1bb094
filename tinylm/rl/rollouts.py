"""The rl stage's batch source: generation batches, their rewards, and micro-batches of them.

Every `steps_per_generation x num_iterations` optimizer steps, `GroupBatches` samples a
generation batch with the policy as it is at that step: `batch_size x steps_per_generation`
prompts (a seeded shuffle per epoch, as every tuning stage), G completions each. It scores
them with the rewards, turns the rewards into group advantages, and (when the batch outlives
its first step) records the sampling policy's log-probs; with `beta` > 0 also the
reference's. Step j of the generation batch trains on its chunk j % steps_per_generation,
so each chunk is seen `num_iterations` (mu) times, as TRL's `_prepare_inputs` buffers them.

Exact resume: the sampling seed is a function of (seed, generation index, process) only, and
a generation batch that is trained on for more than one step is written to
RUN/rollouts/ (atomically) when it is made; a run resumed in the middle of one reads it back
instead of sampling with weights it no longer has.

Under torchrun each process samples the groups of its own micro-batches (a group never spans
two processes, so its advantages need no communication).
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tinylm.console import SILENT, Output
from tinylm.errors import TinyLMError
from tinylm.rl.data import RLPrompt
from tinylm.rl.loss import group_advantages
from tinylm.rl.rewards import Reward, score
from tinylm.rl.sampling import Rollouts, sample_groups, score_rollouts
from tinylm.seeds import step_seed

ROLLOUTS_DIR = "rollouts"
KEEP_ROLLOUTS = 2  # the generation batches in use and the one before


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn and scored (the rl config's sampling part)."""

    num_generations: int
    max_completion_length: int
    temperature: float
    top_p: float
    top_k: int
    scale_rewards: str
    steps_per_generation: int
    num_iterations: int
    micro_batch: int  # sequences per forward (generation batches of 4x that)


class GroupBatches:
    """The loop's batch source (see the module docstring): `batches(step, micro)`."""

    def __init__(self, policy: nn.Module, tokenizer: Any, prompts: Sequence[RLPrompt],
                 prompt_ids: Sequence[list[int]], rewards: Sequence[Reward],
                 settings: SamplingSettings, *, batch_size: int, accum_steps: int, seed: int,
                 rank: int, world_size: int, run_dir: Path,
                 reference: Callable[[Rollouts], Tensor] | None, out: Output = SILENT) -> None:
        self.policy, self.tokenizer, self.prompts, self.prompt_ids = (
            policy, tokenizer, prompts, prompt_ids)
        self.rewards, self.s, self.seed, self.reference, self.out = (
            rewards, settings, seed, reference, out)
        self.batch_size, self.accum, self.rank, self.world = (
            batch_size, accum_steps, rank, world_size)
        if batch_size % world_size:
            raise TinyLMError(f"train.batch_size ({batch_size} prompts) must be a multiple of "
                              f"the {world_size} processes", "so that no group spans two")
        rows = batch_size // world_size * settings.num_generations
        if rows % accum_steps:
            raise TinyLMError(f"{rows} completions per process and step do not split into "
                              f"{accum_steps} micro-batches", "change train.micro_batch")
        self.rows_per_micro = rows // accum_steps
        self.dir = run_dir / ROLLOUTS_DIR
        self.every = settings.steps_per_generation * settings.num_iterations
        self.keeps_state = self.every > 1
        self.current: tuple[int, dict[str, Tensor]] | None = None

    def steps_for(self, epochs: float) -> int:
        """Optimizer steps that see every prompt `epochs` times (each num_iterations times)."""
        per_generation = self.batch_size * self.s.steps_per_generation
        generations = max(1, math.ceil(epochs * len(self.prompts) / per_generation))
        return generations * self.every

    def _prompt_indices(self, generation: int) -> list[int]:
        """This process's prompts of a generation batch: per chunk, its share of batch_size."""
        n, per_gen = len(self.prompts), self.batch_size * self.s.steps_per_generation
        share = self.batch_size // self.world
        orders: dict[int, list[int]] = {}  # epoch -> its seeded order of the prompts
        picked = []
        for chunk in range(self.s.steps_per_generation):
            for k in range(share):
                at = generation * per_gen + chunk * self.batch_size + self.rank * share + k
                if at // n not in orders:
                    orders[at // n] = list(range(n))
                    random.Random(step_seed(self.seed, at // n, 1)).shuffle(orders[at // n])
                picked.append(orders[at // n][at % n])
        return picked

    def _file(self, generation: int) -> Path:
        return self.dir / f"generation-{generation:06d}-rank{self.rank}.safetensors"

    def generation(self, generation: int) -> dict[str, Tensor]:
        """The tensors of generation batch `generation`: read back if saved, else sampled."""
        if self.current is not None and self.current[0] == generation:
            return self.current[1]
        from safetensors.torch import load_file

        path = self._file(generation)
        batch = load_file(path) if self.keeps_state and path.is_file() else None
        if batch is None:
            batch = self._sample(generation)
            if self.keeps_state:
                self._save(generation, batch)
        self.current = (generation, batch)
        return batch

    def _sample(self, generation: int) -> dict[str, Tensor]:
        indices = self._prompt_indices(generation)
        s = self.s
        rollouts = sample_groups(
            self.policy, self.tokenizer, [self.prompt_ids[i] for i in indices],
            s.num_generations, max_new_tokens=s.max_completion_length,
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            seed=step_seed(self.seed, generation, 100 + self.rank),
            batch_size=4 * s.micro_batch)
        table = []
        for j, i in enumerate(indices):
            prompt = self.prompts[i]
            texts = rollouts.texts[j * s.num_generations:(j + 1) * s.num_generations]
            table += score(self.rewards, prompt.text, texts, prompt.row, prompt.source)
        per_reward = torch.tensor(table, dtype=torch.float32).view(len(rollouts.texts), -1)
        weights = torch.tensor([r.weight for r in self.rewards])
        total = per_reward @ weights
        batch = {**rollouts.tensors(), "rewards": per_reward,
                 "advantages": group_advantages(total, s.num_generations, s.scale_rewards)}
        if self.keeps_state:  # later steps of this batch see a policy that has moved
            batch["old_logps"] = score_rollouts(self.policy, rollouts, s.temperature,
                                                s.micro_batch)
        if self.reference is not None:
            batch["ref_logps"] = self.reference(rollouts)
        return batch

    def _save(self, generation: int, batch: dict[str, Tensor]) -> None:
        from safetensors.torch import save_file

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._file(generation)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp))
        tmp.replace(path)
        for old in sorted(self.dir.glob(f"generation-*-rank{self.rank}.safetensors"))[
                :-KEEP_ROLLOUTS]:
            old.unlink(missing_ok=True)

    def __call__(self, step: int, micro: int) -> dict[str, Any]:
        generation, j = divmod(step, self.every)
        batch = self.generation(generation)
        chunk = j % self.s.steps_per_generation
        per_chunk = self.accum * self.rows_per_micro
        local = micro - self.rank * self.accum
        start = chunk * per_chunk + local * self.rows_per_micro
        rows = slice(start, start + self.rows_per_micro)
        chunk_rows = slice(chunk * per_chunk, (chunk + 1) * per_chunk)
        out = trimmed({k: v[rows] for k, v in batch.items() if k not in ("rewards", "ended")})
        out["stats"] = chunk_stats(batch, chunk_rows, self.s.num_generations,
                                   [r.name for r in self.rewards],
                                   [r.weight for r in self.rewards])
        return out


def trimmed(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A micro-batch without the padding columns none of its rows needs: prompts are
    left-padded to the generation batch's longest, completions right-padded to its longest
    (the model counts positions from each row's first token, so nothing else changes)."""
    width = max(int(batch["completion_mask"].sum(-1).max()), 1)
    pad = int((batch["prompt_mask"].sum(0) == 0).sum())
    out = dict(batch)
    for key in ("completion_ids", "completion_mask", "old_logps", "ref_logps"):
        if key in out:
            out[key] = out[key][:, :width]
    for key in ("prompt_ids", "prompt_mask"):
        out[key] = batch[key][:, pad:]
    return out


def clear_rollouts(run_dir: Path) -> None:
    """Remove the saved generation batches of an earlier run (a fresh start)."""
    shutil.rmtree(run_dir / ROLLOUTS_DIR, ignore_errors=True)


def chunk_stats(batch: dict[str, Tensor], rows: slice, group_size: int, names: list[str],
                weights: list[float]) -> dict[str, float]:
    """TRL's generation metrics over one step's completions: reward mean/std (total and per
    reward), the share of groups with one reward for all, and completion lengths."""
    per_reward = batch["rewards"][rows]
    total = per_reward @ torch.tensor(weights)
    lengths = batch["completion_mask"][rows].sum(-1).float()
    ended = batch["ended"][rows]
    stats = {"reward": total.mean().item(),
             "reward_std": total.std().item() if total.numel() > 1 else 0.0,
             "frac_reward_zero_std": (total.view(-1, group_size).std(-1) == 0).float()
             .mean().item()}
    for i, name in enumerate(names):
        stats[f"rewards/{name}/mean"] = per_reward[:, i].mean().item()
        stats[f"rewards/{name}/std"] = per_reward[:, i].std().item() if total.numel() > 1 else 0.0
    terminated = lengths[ended] if ended.any() else torch.zeros(1)
    stats |= {"completions/mean_length": lengths.mean().item(),
              "completions/min_length": lengths.min().item(),
              "completions/max_length": lengths.max().item(),
              "completions/clipped_ratio": (~ended).float().mean().item(),
              "completions/mean_terminated_length": terminated.mean().item(),
              "completions/min_terminated_length": terminated.min().item(),
              "completions/max_terminated_length": terminated.max().item()}
    return stats
