"""Trainer callbacks: metrics.jsonl, the progress bar, and the non-finite gradient guard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from .trainer import NON_FINITE_CAUSES, NonFiniteError


class MetricsJsonl(TrainerCallback):
    """Append one JSON object per logged step to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def read_metrics(run: str) -> list[dict]:
    """The rows MetricsJsonl wrote: a local run folder, or a Hub repo that carries one; [] without it."""
    path = Path(run) / "metrics.jsonl"
    if not Path(run).is_dir():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(run, "metrics.jsonl"))
        except Exception:  # pushed adapters usually leave their logs behind
            return []
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class FiniteGradGuard(TrainerCallback):
    """Stop before the optimizer applies a NaN/inf gradient, so no weight is corrupted."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        if not torch.isfinite(norm):
            raise NonFiniteError(f"non-finite gradient norm ({norm.item()}) at step {state.global_step + 1}; {NON_FINITE_CAUSES}")


class ProgressBar(TrainerCallback):
    """tqdm bar over optimizer steps showing loss, reward accuracy, margin and pairs/s."""

    def __init__(self, pairs_per_step: int):
        self.pairs_per_step = pairs_per_step
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="simpo", unit="step", dynamic_ncols=True)
            self.t0, self.step0 = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        pairs_s = (state.global_step - self.step0) * self.pairs_per_step / elapsed
        post = {"loss": f"{logs['loss']:.4f}", "pairs/s": f"{pairs_s:.2f}"}
        if not math.isnan(logs.get("rewards/accuracies", math.nan)):
            post["acc"] = f"{logs['rewards/accuracies']:.2f}"
            post["margin"] = f"{logs['rewards/margins']:.3f}"
        self.bar.set_postfix(post, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
