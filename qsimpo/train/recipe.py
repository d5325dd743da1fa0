"""`qsimpo train`: the recipe, top to bottom.

config → tokenizer → preference pairs (with a summary of what was kept and dropped) →
4-bit base + LoRA → (DPO: the reference log-probs, once) → PreferenceTrainer with the loss of
``loss.type`` (SimPO by default) → adapter folder with its provenance.

    qsimpo train configs/quickstart.yaml --train.output_dir adapters/x

Ctrl-C (SIGINT) or SIGTERM finishes the current optimizer step, saves a checkpoint there and exits
with 130, printing the command that resumes (``--train.resume_from auto``); a second one exits at once.
"""

from __future__ import annotations

import os
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from qsimpo.run_dir import (CHECKPOINT_MARKER, CONFIG, METRICS, has_adapter, is_complete, update_meta, write_config,
                            write_meta)
from qsimpo.train.callbacks import (CheckpointMarker, FiniteGradGuard, MetricsJsonl, NothingLeftToTrain, ProgressBar,
                                    SkipFinishedRun, StopOnSignal, checkpoints, last_complete_checkpoint)
from qsimpo.config import Config, ConfigError
from qsimpo.console import is_main, say
from qsimpo.data import read_source, split_eval, tokenize_source
from qsimpo.errors import InputNotFound, Interrupted, OutputExists
from qsimpo.train.logprobs import head_chunk_rows
from qsimpo.train.model import add_lora, compute_dtype, load_base, load_tokenizer
from qsimpo.train.packing import make_collator
from qsimpo.train.losses import make_loss
from qsimpo.train.stack import check_sft_base, keep_sft_active, stack_on_sft, write_aligned
from qsimpo.train.trainer import PreferenceTrainer
from qsimpo.templates import require_template



class PairDataset(torch.utils.data.Dataset):
    def __init__(self, pairs: list[dict], reference=None):
        self.pairs = pairs
        self.reference = reference  # DPO: qsimpo.train.reference.Reference of these pairs, in their order

    def __len__(self):
        return len(self.pairs)

    @property
    def lengths(self) -> list[int]:
        if hasattr(self.pairs, "lengths"):  # qsimpo.data.Pairs: a column of the table, no row decoded
            return self.pairs.lengths
        return [len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in self.pairs]

    def __getitem__(self, i):
        p = self.pairs[i]
        item = {"prompt_ids": p["prompt_ids"], "chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]}
        if self.reference is not None:
            item["ref_chosen"], item["ref_rejected"] = self.reference.chosen[i], self.reference.rejected[i]
        return item


is_main_process = is_main  # the one test of process 0 (qsimpo.console)


def resolve_resume(resume_from: str | None, output_dir: Path) -> str | None:
    """The checkpoint folder to resume from: ``auto`` takes the newest complete one in ``output_dir``."""
    if resume_from is None:
        return None
    if resume_from == "auto":
        for _, folder in reversed(checkpoints(output_dir)):
            if is_complete(folder):
                say(f"train.resume_from auto: resuming from {folder}")
                return str(folder)
            say(f"train.resume_from auto: skipping {folder}: incomplete (it has no {CHECKPOINT_MARKER}: the run was "
                f"killed while saving it); if you know it is whole, pass it as --train.resume_from {folder}")
        say(f"train.resume_from auto: no complete checkpoint in {output_dir}; starting from scratch")
        return None
    folder = Path(resume_from)
    if not (folder / "trainer_state.json").is_file():
        what = "has no trainer_state.json" if folder.is_dir() else "does not exist"
        raise InputNotFound(f"train.resume_from = {resume_from!r} {what}, so it is not a checkpoint: pass "
                            f"--train.resume_from auto (the newest complete checkpoint in {output_dir}) or a folder like "
                            f"{output_dir}/checkpoint-100")
    if not is_complete(folder):
        say(f"train.resume_from: {folder} has no {CHECKPOINT_MARKER} (saved by an older qsimpo, or cut short while "
            "saving); resuming from it as asked")
    return resume_from


def check_output_dir(cfg: Config, output_dir: Path) -> None:
    if has_adapter(output_dir) and not cfg.train.overwrite and cfg.train.resume_from is None:
        raise OutputExists(
            f"train.output_dir = {output_dir} already holds a finished adapter: choose another --train.output_dir, "
            f"pass --train.overwrite true to replace it, or --train.resume_from auto to continue"
        )


def resume_command(command: list[str] | None, output_dir: Path) -> str:
    """``command`` (the argv that started the run, or its saved config) with ``--train.resume_from auto``."""
    if command is None:
        command = ["qsimpo", "train", str(output_dir / CONFIG)]
    kept, skip = [], False
    for arg in command:
        if not skip and arg != "--train.resume_from" and not arg.startswith("--train.resume_from="):
            kept.append(arg)
        skip = arg == "--train.resume_from"
    return shlex.join([*kept, "--train.resume_from", "auto"])


def interrupted(what: str, output_dir: Path, command: str) -> Interrupted:
    last = last_complete_checkpoint(output_dir)
    if last is None:
        return Interrupted(f"{what}; no checkpoint was saved yet. Start again with:\n  {command}")
    return Interrupted(f"{what}; the last complete checkpoint is {last}. Resume with:\n  {command}")


@contextmanager
def stop_on_signals(output_dir: Path, command: str):
    """SIGINT/SIGTERM handled by StopOnSignal for the whole run; a stop that cannot wait raises Interrupted."""
    with StopOnSignal() as stop:
        try:
            yield stop
        except KeyboardInterrupt as e:
            name = str(e) or "SIGINT"
            if stop.received:
                what = f"stopped at once by a second signal ({name})"
            elif stop.loop_done:
                what = f"stopped by {name} after the last training step, before the adapter was written"
            else:
                what = f"stopped by {name} before training started"
            raise interrupted(what, output_dir, command) from None


def read_sources(cfg: Config) -> dict:
    """The training source and, when data.eval names one, the held-out source: read and judged, not tokenized.

    Runs before the tokenizer and the model load, so bad data stops a run in seconds.
    """
    sources = {"train": read_source(cfg.data)}
    if cfg.data.eval is not None and cfg.data.eval_fraction is None:
        sources["eval"] = read_source(cfg.data, path=cfg.data.eval)
    return sources


def load_pairs(cfg: Config, tokenizer, sources: dict | None = None):
    """Training pairs, held-out pairs (or None), and the data summaries, printed once."""
    sources = sources or read_sources(cfg)
    pairs, summary = tokenize_source(cfg.data, sources["train"], tokenizer)
    summaries = {"train": summary.to_dict()}
    eval_pairs = None
    if "eval" in sources:
        eval_pairs, eval_summary = tokenize_source(cfg.data, sources["eval"], tokenizer)
        summaries["eval"] = eval_summary.to_dict()
    elif cfg.data.eval is not None:
        pairs, eval_pairs = split_eval(pairs, cfg.data.eval_fraction, cfg.train.seed)
    if is_main_process():
        say(summary.report())
        if "eval" in summaries:
            say(eval_summary.report())
    return pairs, eval_pairs, summaries


def training_arguments(cfg: Config, output_dir: Path, has_eval: bool, device: str):
    from transformers import TrainingArguments

    t = cfg.train
    dtype = next(iter({"bfloat16", "float16"} & {cfg.model.compute_dtype}), None)
    eval_kwargs = {}
    if has_eval and t.eval_every > 0:
        eval_kwargs = {"eval_strategy": "steps", "eval_steps": t.eval_every}
    fsdp_kwargs = {}
    if t.fsdp:  # FSDP2 through accelerate, as configs/accelerate/fsdp-qlora.yaml: one unit per decoder layer
        fsdp_kwargs = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True}}
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # a NaN must surface, not be averaged away
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        report_to=t.report_to,
        remove_unused_columns=False,
        disable_tqdm=True,  # our ProgressBar replaces the stock one
        use_cpu=device == "cpu",
        bf16=device != "cpu" and dtype == "bfloat16",
        fp16=device != "cpu" and dtype == "float16",
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=device != "cpu",
        # activation checkpointing stays off here: add_lora enables it on the model (non-reentrant)
        **eval_kwargs,
        **fsdp_kwargs,
    )


def checkpoint_split(cfg: Config, pairs, device: str) -> bool | int:
    """train.gradient_checkpointing as add_lora takes it: true/false as set, or for auto the number of layers
    qsimpo plan's estimate says the budget needs, for this data's longest pairs. The budget is
    train.memory_budget, else the GPU's free memory now (on the CPU auto needs train.memory_budget)."""
    if cfg.train.gradient_checkpointing != "auto":
        return cfg.train.gradient_checkpointing
    from qsimpo.config import parse_size
    from qsimpo.train.model import load_model_config
    from qsimpo.train.plan import checkpointed_layers, shape_of, split_text, worst_batch

    if cfg.train.memory_budget:
        budget = parse_size(cfg.train.memory_budget)
    elif torch.device(device).type == "cuda":
        budget = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        raise ConfigError(["train.gradient_checkpointing = 'auto' sizes the split by the GPU's free memory, and this run "
                           "has no GPU: set train.memory_budget (e.g. --train.memory_budget 16GiB), or true/false"])
    shape = shape_of(load_model_config(cfg.model))
    # each pair's total length stands for its prompt, chosen and rejected: the batch is never underestimated
    batch = worst_batch(cfg, [(0, n, 0) for n in pairs.lengths])
    processes = int(os.environ.get("WORLD_SIZE", 1))
    checkpointed = checkpointed_layers(cfg, shape, batch, budget, processes)
    if is_main_process():
        say(f"activation checkpointing: {split_text(cfg, checkpointed, shape.layers, budget)}; "
              f"worst micro-batch {batch.tokens} tokens")
    return checkpointed


def loss_settings(cfg: Config) -> dict:
    """The loss a run trained with and its parameters, as qsimpo.json records them (and the model card shows)."""
    params = dict(getattr(cfg, cfg.loss.type).__dict__)
    if cfg.loss.type == "simpo":
        params["gamma_resolved"] = cfg.simpo.resolved_gamma
    return {"type": cfg.loss.type, **params}


def has_nll(cfg: Config) -> bool:
    """Whether the chosen loss adds an NLL term on the chosen responses (then logged as "nll")."""
    kind = cfg.loss.type
    return (kind == "orpo" or (kind in ("cpo", "arpo") and getattr(cfg, kind).alpha > 0)
            or (kind == "simpo" and cfg.simpo.sft_weight > 0))


def reference_pass(cfg: Config, model, pairs, eval_pairs, tokenizer, args, head_chunk: int, dtype, output_dir: Path,
                   resuming: bool) -> dict:
    """DPO: the reference log-probs of the training (and held-out) pairs, read back or computed once; {} for other losses.

    Process 0 goes first (``main_process_first``) and stores them; the others then read the same file."""
    if cfg.loss.type != "dpo":
        return {}
    from qsimpo.train.reference import load_or_compute, summary_line

    collate = make_collator(cfg.train.packing, tokenizer.pad_token_id, cfg.model.attn_implementation)
    amp = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    refs = {}
    with args.main_process_first(desc="dpo reference log-probs"):
        for split, split_pairs in (("train", pairs), ("eval", eval_pairs)):
            if split_pairs:
                refs[split] = load_or_compute(cfg, model, split_pairs, split, collate, head_chunk, dtype,
                                              output_dir / "reference", amp, say, resuming)
    say(summary_line(refs))
    return refs


def write_provenance(cfg: Config, output_dir: Path, trainer, summaries: dict, references: dict | None = None) -> None:
    from qsimpo.record import versions

    from qsimpo.train.reference import provenance as reference_provenance

    write_config(output_dir, cfg)
    meta = {
        "base_model": cfg.model.name_or_path,
        "base_model_revision": cfg.model.revision,
        "base_model_gguf_file": cfg.model.gguf_file,
        "quantization": cfg.model.quantization,
        "loss": loss_settings(cfg),
        **({"simpo": {**cfg.simpo.__dict__, "gamma_resolved": cfg.simpo.resolved_gamma}} if cfg.loss.type == "simpo" else {}),
        **({"reference": reference_provenance(references)} if references else {}),
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "data": summaries,
        "versions": versions(),  # qsimpo's own version is versions["qsimpo"]
    }
    write_meta(output_dir, meta)


@dataclass
class TrainRun:
    output_dir: Path
    trainer: PreferenceTrainer  # .model is the trained PeftModel, .state the final TrainerState


def train(cfg: Config, command: list[str] | None = None) -> TrainRun:
    """Run preference training (SimPO, or the loss of loss.type) as configured; the adapter and its provenance land in train.output_dir.

    ``command`` is the argv that started the run (``["qsimpo", "train", "cfg.yaml", ...]``); an interrupted
    run prints it with ``--train.resume_from auto`` (without it: the run's saved config.yaml).
    """
    from transformers import PrinterCallback, ProgressCallback, set_seed

    from qsimpo.train.model import device_for_rank

    output_dir = Path(cfg.train.output_dir)
    check_output_dir(cfg, output_dir)
    set_seed(cfg.train.seed)
    device = device_for_rank()
    if cfg.model.attn_implementation == "flex_attention" and torch.device(device).type != "cuda":
        raise ConfigError([f"model.attn_implementation = 'flex_attention' trains only on CUDA (torch has no FlexAttention "
                           f"backward on {torch.device(device).type}): use sdpa here"])
    if cfg.train.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        raise ConfigError(["train.fsdp = true shards across processes, and this is one: launch with "
                           "`torchrun --nproc_per_node N -m qsimpo train ...`, or set train.fsdp false"])
    resume_hint = resume_command(command, output_dir)

    with stop_on_signals(output_dir, resume_hint) as stop:
        sources = read_sources(cfg)  # bad data stops here, before anything loads
        if cfg.model.sft_adapter:
            check_sft_base(cfg)
        tokenizer = load_tokenizer(cfg.model)  # model.chat_template, else the SFT adapter's, else the base's
        if cfg.model.sft_adapter or sources["train"].summary.format == "conversational":
            require_template(tokenizer, cfg.model.name_or_path, "qsimpo train")
        pairs, eval_pairs, summaries = load_pairs(cfg, tokenizer, sources)

        checkpointed = checkpoint_split(cfg, pairs, device)
        model = load_base(cfg.model, device)
        model = add_lora(model, cfg.lora, cfg.model.quantization != "none", checkpointed, cfg.train.seed)
        if cfg.model.sft_adapter:  # SimPO on top of the frozen SFT adapter (qsimpo.train.stack)
            model = stack_on_sft(model, cfg.model.sft_adapter)

        output_dir.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            write_config(output_dir, cfg)  # the run folder says what it is while it runs
        resume = resolve_resume(cfg.train.resume_from, output_dir)
        metrics_path = output_dir / METRICS
        if resume is None and is_main_process() and metrics_path.exists():
            metrics_path.unlink()  # a fresh run starts a fresh log; a resumed one appends
        args = training_arguments(cfg, output_dir, eval_pairs is not None, device)
        head_chunk = head_chunk_rows(cfg.train.head_chunk_size, model.config.vocab_size)
        dtype = compute_dtype(cfg.model.compute_dtype, device)
        references = reference_pass(cfg, model, pairs, eval_pairs, tokenizer, args, head_chunk, dtype, output_dir,
                                    resuming=resume is not None)
        trainer = PreferenceTrainer(
            model=model,
            args=args,
            data_collator=make_collator(cfg.train.packing, tokenizer.pad_token_id, cfg.model.attn_implementation),
            train_dataset=PairDataset(pairs, references.get("train")),
            eval_dataset=PairDataset(eval_pairs, references.get("eval")) if eval_pairs else None,
            processing_class=tokenizer,
            # StopOnSignal may set should_save in on_step_end: CheckpointMarker must come after it
            callbacks=[FiniteGradGuard(), MetricsJsonl(metrics_path), SkipFinishedRun(), stop, CheckpointMarker(),
                       keep_sft_active()],
            loss_fn=make_loss(cfg),
            logs_nll=has_nll(cfg),
            head_chunk_size=head_chunk,
            compute_dtype=dtype,
            group_by_length=cfg.train.group_by_length,
        )
        trainer.remove_callback(ProgressCallback)
        if cfg.train.progress:
            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(ProgressBar(cfg.train.batch_size * cfg.train.gradient_accumulation_steps * args.world_size,
                                             cfg.loss.type))

        try:
            trainer.train(resume_from_checkpoint=resume)
        except NothingLeftToTrain:
            stop.loop_done = True
            if is_main_process():
                say(f"train.resume_from: {resume} holds the last step ({trainer.state.global_step}); writing the adapter")
        if stop.requested(args.device):  # every process agrees, so all stop here together
            step, last = trainer.state.global_step, trainer.state.max_steps
            raise interrupted(f"stopped by {stop.received or 'a signal to another process'} after step {step} of {last}",
                              output_dir, resume_hint)
        last_eval = cfg.train.eval_every and trainer.state.global_step % cfg.train.eval_every == 0
        if eval_pairs and not last_eval:
            trainer.evaluate()
        trainer.save_model(str(output_dir))  # adapter_config.json + adapter_model.safetensors
        if trainer.is_world_process_zero():
            write_provenance(cfg, output_dir, trainer, summaries, references)
            update_meta(output_dir, chat_template=tokenizer.chat_template)  # every later command renders with it
            if cfg.model.sft_adapter:
                write_aligned(output_dir, cfg.model.sft_adapter)
    return TrainRun(output_dir, trainer)
