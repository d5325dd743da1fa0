"""Trainer callbacks: metrics.jsonl, the progress bar, the non-finite gradient guard, checkpoints marked
complete, and stopping on SIGINT/SIGTERM with a checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from qsimpo.run_dir import CHECKPOINT_MARKER, is_complete

from qsimpo.train.trainer import NON_FINITE_CAUSES, NonFiniteError


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

    def __init__(self, pairs_per_step: int, label: str = "simpo", unit: str = "pairs"):
        self.pairs_per_step, self.label = pairs_per_step, label  # label: the loss being trained
        self.unit = unit  # what a step's rows are: pairs, or conversations for `qsimpo sft`
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.label, unit="step", dynamic_ncols=True)
            self.t0, self.step0 = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs or "loss" not in logs:
            return
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        pairs_s = (state.global_step - self.step0) * self.pairs_per_step / elapsed
        post = {"loss": f"{logs['loss']:.4f}", f"{self.unit}/s": f"{pairs_s:.2f}"}
        if not math.isnan(logs.get("rewards/accuracies", math.nan)):
            post["acc"] = f"{logs['rewards/accuracies']:.2f}"
            post["margin"] = f"{logs['rewards/margins']:.3f}"
        self.bar.set_postfix(post, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ------------------------------------------------------------------------------------- checkpoints


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """The Trainer's checkpoint-N folders in ``output_dir``, as (N, folder), oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and path.is_dir():
            found.append((int(step), path))
    return sorted(found)


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    complete = [path for _, path in checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: bool, device) -> bool:
    """True on every process when ``flag`` is true on any (every process must call it at the same point)."""
    if not _distributed():
        return flag
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class CheckpointMarker(TrainerCallback):
    """Mark each checkpoint-N complete once every process has written it, so resuming never picks one a
    hard kill (SIGKILL, out of memory, power) cut short. Must come after every callback that sets
    ``control.should_save`` in on_step_end (DefaultFlowCallback, StopOnSignal)."""

    def on_step_end(self, args, state, control, **kwargs):
        # A resumed run can save into a checkpoint-N left by an earlier one: drop its marker before the
        # files are rewritten, so a kill during the rewrite leaves no marker over mixed files.
        if control.should_save and state.is_world_process_zero:
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_MARKER).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):
        if _distributed():  # other ranks may still be writing their RNG state or shards
            import torch.distributed as dist

            dist.barrier()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            tmp = folder / f".{CHECKPOINT_MARKER}.tmp"
            tmp.write_text(json.dumps({"global_step": state.global_step, "files": sorted(p.name for p in folder.iterdir())}) + "\n")
            tmp.replace(folder / CHECKPOINT_MARKER)  # atomic: the marker is there whole or not at all


class NothingLeftToTrain(Exception):
    """Raised by SkipFinishedRun out of trainer.train(): the resumed checkpoint holds the last step."""


class SkipFinishedRun(TrainerCallback):
    """Resuming from a checkpoint saved at the last step (a run stopped after its last step, before the
    adapter was written): leave trainer.train() once it has loaded the checkpoint, before its loop, which
    checks for the end only after a step and so would train one step past max_steps."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise NothingLeftToTrain


# -------------------------------------------------------------------------------------- interruption
class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM during training: finish the optimizer step, save a checkpoint there, stop.

    Used as a context manager around the whole run, it owns both signals. During the training loop
    the first signal only sets a flag; at the end of the step every process agrees on it (so no rank
    waits in a collective for one that left) and the Trainer saves and leaves the loop through
    ``control.should_save`` / ``control.should_training_stop``; train() then raises Interrupted. A
    second signal, or one outside the loop (loading, final evaluation), stops at once by raising
    KeyboardInterrupt, which train() turns into Interrupted naming the last complete checkpoint.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.received: str | None = None  # the first signal's name, during the loop
        self.received_at = 0.0
        self.in_loop = self.loop_done = False
        self._previous: dict = {}
        # torchrun forwards the terminal's Ctrl-C to workers that got it already: one press, two signals
        self.same_press_s = 2.0 if "TORCHELASTIC_RUN_ID" in os.environ else 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.in_loop and self.received is None:
            self.received, self.received_at = name, time.monotonic()
            if int(os.environ.get("RANK", 0)) == 0:  # os.write: print() could re-enter a stream being written
                os.write(2, f"\n{name}: finishing this step, then saving a checkpoint; {name} again stops at once\n".encode())
            return
        if self.received is not None and time.monotonic() - self.received_at < self.same_press_s:
            return
        raise KeyboardInterrupt(name)

    def requested(self, device) -> bool:
        """Whether any process received a stop signal (a collective: every process calls it together)."""
        return any_rank(self.received is not None, device)

    def on_train_begin(self, args, state, control, **kwargs):
        self.in_loop = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested(args.device):
            control.should_save = control.should_training_stop = True
            control.should_evaluate = False  # stop within one step: an evaluation due now is skipped

    def on_train_end(self, args, state, control, **kwargs):
        self.in_loop, self.loop_done = False, True
