"""The thin ``transformers.Trainer`` subclass: batch → log-probs → the preference loss → metrics.

Everything else (loop, gradient accumulation, checkpoints, resume, DDP/FSDP/DeepSpeed via
accelerate, report_to) is the stock Trainer. A batch is either layout of ``qsimpo.train.packing``
(one packed row per pair, or the B chosen rows followed by the B rejected rows); both say
which positions to score the same way, so ``qsimpo.response_logps.pair_sequence_logps`` serves them alike.
The loss is any of ``qsimpo.train.losses`` (SimPO by default), bound to its config by ``make_loss``;
DPO's batches carry their pairs' stored reference log-probs (``qsimpo.train.reference``).
"""

from __future__ import annotations

import os
from collections import defaultdict

import torch
from accelerate.utils import DistributedType
from transformers import Trainer

from qsimpo.config import ConfigError
from qsimpo.errors import QsimpoError
from qsimpo.response_logps import pair_sequence_logps, unwrap
from qsimpo.train.losses import LossFn


class NonFiniteError(QsimpoError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; raised before the optimizer step."""

    exit_code = 1  # a check that ran and failed (qsimpo.errors: CheckFailed)


NON_FINITE_CAUSES = (
    "likely causes: a learning rate too high for LoRA (try 10x lower), fp16 overflow (use bf16 or fp32 compute), "
    "or a data row with an extreme response (run `qsimpo inspect-data` on the config). The last saved checkpoint "
    "in train.output_dir is intact: fix the cause and resume with --train.resume_from auto"
)


def pair_metrics(chosen_logps, rejected_logps, chosen_rewards, rejected_rewards) -> dict[str, torch.Tensor]:
    """The per-pair quantities logged every step (averaged over pairs at logging time).

    rewards/* are the loss's own (SimPO: β·average log-prob; DPO: β·(log π − log π_ref); ...);
    logps/accuracies is one definition for every loss, the one `qsimpo eval` reports: the chosen
    response's average log-prob above the rejected one's.
    """
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
        "logps/accuracies": (chosen_logps > rejected_logps).float().detach(),
    }


class GlobalLengthGroupedSampler(torch.utils.data.Sampler):
    """Shuffled mega-batches, each sorted by length, in units of one optimizer step's pairs on all processes.

    Every process draws the same order (seed + epoch, not the global RNG), and accelerate hands
    consecutive per-device batches of it to the processes in turn, so an optimizer step sees the
    same pairs whatever the process count, given the same global batch.
    """

    def __init__(self, global_batch: int, lengths: list[int], seed: int):
        self.global_batch, self.lengths, self.seed, self.epoch = global_batch, lengths, seed, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate and the Trainer call it before each epoch
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.global_batch, generator=generator))


def enable_fsdp_on_cpu(trainer, state) -> None:
    """FSDP for CPU processes (gloo), which accelerate leaves as plain DDP.

    accelerate turns FSDP on only for accelerator devices and would silently run data-parallel;
    torch's ``fully_shard`` runs on the CPU too. Set where accelerate would have set it, from the
    same plugin arguments (train.fsdp) or the same environment (``accelerate launch`` with an FSDP
    config), so the Trainer takes its FSDP path: wrapping, optimizer, full-state-dict saving.
    """
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    args = trainer.args.fsdp_plugin_args
    plugin = FullyShardedDataParallelPlugin(**args) if args is not None else FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    # accelerate has no public way to this (1.15): AcceleratorState.__init__ turns FSDP on (from a plugin or
    # ACCELERATE_USE_FSDP) only inside its branch for accelerator devices (MULTI_GPU, MULTI_NPU, ...), and
    # PartialState picks MULTI_CPU for gloo processes with no option to ask for more. Every AcceleratorState()
    # built later copies distributed_type from PartialState's shared state, and accelerate's collectives read
    # PartialState().distributed_type, so it is set there too: private state, which
    # tests/train/test_distributed.py::test_accelerate_still_keeps_fsdp_on_cpu_where_qsimpo_sets_it watches.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True


class PreferenceTrainer(Trainer):
    def __init__(self, *args, loss_fn: LossFn, logs_nll: bool = False, head_chunk_size: int = 0,
                 compute_dtype=torch.float32, group_by_length: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.group_by_length = group_by_length
        self.loss_fn = loss_fn  # qsimpo.train.losses.make_loss(cfg)
        self.logs_nll = logs_nll  # the loss has an NLL term: log it as "nll"
        self.head_chunk_size = head_chunk_size  # 0: full logits (the plain path)
        self.compute_dtype = compute_dtype
        # Our loss is a mean over the micro-batch's pairs (and its NLL term a mean over the micro-batch's
        # chosen tokens, as TRL's), not a token-count-normalised LM loss over the whole accumulated
        # batch: let the Trainer divide each micro-batch's loss by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self._stash: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def pair_logps(self, model, inputs):
        return pair_sequence_logps(model, inputs, self.head_chunk_size, self.compute_dtype)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        asked = self.args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if asked and state.distributed_type == DistributedType.MULTI_CPU:
            enable_fsdp_on_cpu(self, state)
        if self.is_fsdp_enabled and getattr(unwrap(self.model), "is_loaded_in_8bit", False):
            raise ConfigError(["FSDP cannot shard model.quantization int8 weights (bitsandbytes' int8 parameters lose "
                               "their quantization state when split): use nf4 or none, or train data-parallel without FSDP"])

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        a = self.args
        return GlobalLengthGroupedSampler(a.train_batch_size * a.gradient_accumulation_steps * a.world_size,
                                          dataset.lengths, a.data_seed if a.data_seed is not None else a.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = self.pair_logps(model, inputs)
        reference = (inputs["ref_chosen"], inputs["ref_rejected"]) if "ref_chosen" in inputs else None
        out = self.loss_fn(chosen, rejected, reference)
        loss = out.loss
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1} "
                f"(chosen avg log-probs {chosen.avg.tolist()}, rejected {rejected.avg.tolist()}); {NON_FINITE_CAUSES}"
            )
        mode = "train" if model.training else "eval"
        for k, v in pair_metrics(chosen.avg, rejected.avg, out.chosen_rewards, out.rejected_rewards).items():
            self._stash[mode][k].append(v.detach().float())
        if self.logs_nll:
            self._stash[mode]["nll"].append(out.nll.float().reshape(1))
        if mode == "eval":  # the micro-batch's loss, once per pair: averaged over pairs like the rest
            self._stash[mode]["loss"].append(loss.detach().float().expand(len(out.losses)))
        return (loss, {"chosen": chosen.avg, "rejected": rejected.avg}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        stash = self._stash[mode]
        for key, values in stash.items():
            value = torch.cat(values).mean()
            if self.args.world_size > 1:  # every rank logs the same, all-pairs average
                value = self.accelerator.reduce(value.to(self.accelerator.device), reduction="mean")
            name = f"eval_{key}" if mode == "eval" else key
            if name not in logs:
                logs[name] = round(value.item(), 6)
        stash.clear()
        super().log(logs, start_time)


SimPOTrainer = PreferenceTrainer  # the name it had when SimPO was its only loss
