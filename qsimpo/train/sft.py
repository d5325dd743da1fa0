"""`qsimpo sft`: supervised fine-tuning of a LoRA adapter on the 4-bit base, the loss on the assistant's tokens only.

config → tokenizer (with model.chat_template for a base that has none) → conversations (qsimpo.data.conversations,
with the same bad-row report as pairs) → 4-bit base + LoRA → SFTTrainer → adapter folder, its tokenizer files
holding the chat template, and qsimpo.json recording it, so `qsimpo train --model.sft_adapter` and every later
command render prompts the way this model learnt them.

    qsimpo sft configs/mistral-7b-base-sft.yaml --train.output_dir adapters/mistral-sft

The steps are `qsimpo train`'s (qsimpo.train.recipe: resume, SIGTERM save, run folder, metrics, progress), and
the trainer is PreferenceTrainer with its loss swapped: negative mean log-prob of the assistant tokens of the
micro-batch, computed by the same response-only chunked head (no full-vocabulary logits).

Packing (train.packing other than none, the default): before training, the conversations are packed once into
rows of up to data.max_length tokens, best-fit decreasing by length (pack_rows, as TRL's packing), and
train.batch_size counts those rows: a micro-batch is at most batch_size × max_length tokens whatever the
conversations, so memory is bounded by the config, not by the longest conversations drawn together. In a row
each conversation attends only to itself (qsimpo.train.packing's block-diagonal mask with one segment per
conversation) with positions restarting at 0, so the loss is the loss of the same conversations each in its
own padded row (tests/train/test_sft.py) while no compute goes to padding. No conversation is dropped: one
longer than max_length was already cut to it when tokenized (and counted in the data report). With
train.packing none, batch_size counts conversations, one per padded row.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qsimpo.console import say, warn
from qsimpo.config import Config, ConfigError
from qsimpo.response_logps import attn_implementation, scoring_head
from qsimpo.train.logprobs import head_chunk_rows
from qsimpo.train.packing import PROMPT, attention_inputs, plain_score_tensors
from qsimpo.train.trainer import NON_FINITE_CAUSES, NonFiniteError, PreferenceTrainer


# ------------------------------------------------------------------------------------------- batches
def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices per row, best-fit decreasing: longest first, each into the fullest row it still fits (a new row when
    none has room; one longer than ``capacity`` alone). Every index lands in exactly one row; rows keep the order
    they were opened in. O(n log capacity): the rows with room are kept by how much room they have."""
    from bisect import bisect_left, insort

    rows: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct room sizes that some row has
    by_room: dict[int, list[int]] = {}  # room size -> the rows with it
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        k = bisect_left(rooms, n)
        if k == len(rooms):
            rows.append([i])
            r, room = len(rows) - 1, capacity - n
        else:
            have = rooms[k]
            r = by_room[have].pop()
            if not by_room[have]:
                del by_room[have], rooms[k]
            rows[r].append(i)
            room = have - n
        if room > 0:
            if room not in by_room:
                by_room[room] = []
                insort(rooms, room)
            by_room[room].append(r)
    return rows


class PackedRows(torch.utils.data.Dataset):
    """The training set as packed rows: item i is ``{"pack": [conversation, ...]}``, the conversations of row i.

    ``packs`` come from pack_rows over every conversation's length, once, before training; the sampler then
    draws rows (seeded per epoch; length-grouped by ``lengths`` with train.group_by_length, as pairs are), and
    ConversationCollator lays each pack out as one row.
    """

    def __init__(self, convs, capacity: int):
        self.convs = convs
        lengths = [len(ids) for ids in convs["input_ids"]] if hasattr(convs, "column_names") else [
            len(c["input_ids"]) for c in convs]
        self.tokens = sum(lengths)
        self.packs = pack_rows(lengths, capacity)
        # each row's tokens: PreferenceTrainer's length-grouped sampler (train.group_by_length) orders rows by them,
        # the same order on every process count, as it orders pairs
        self.lengths = [sum(lengths[j] for j in pack) for pack in self.packs]

    def __len__(self):
        return len(self.packs)

    def __getitem__(self, i):
        return {"pack": [self.convs[j] for j in self.packs[i]]}

    def summary(self, capacity: int) -> str:
        fill = self.tokens / (len(self.packs) * capacity) if self.packs else 0.0
        return (f"packing: {len(self.convs)} conversations ({self.tokens} tokens) in {len(self.packs)} rows of up to "
                f"{capacity} tokens ({fill:.0%} full); train.batch_size counts rows")


class ConversationCollator:
    """Conversations (input_ids, assistant_mask) → a batch scored on the assistant tokens (score_* tensors).

    ``pack_to`` None: one conversation per row, right-padded, with the 2-D padding mask. Else packed rows of at
    most ``pack_to`` tokens (0: the whole micro-batch in one row, for FlexAttention), carrying ``pair_doc`` (which
    conversation a token is in; −1 padding) and ``segment`` for ``qsimpo.train.packing.attention_inputs``.
    ``score_seq`` is the conversation's index in the micro-batch, in either layout.
    """

    def __init__(self, pad_token_id: int, pack_to: int | None = None):
        self.pad_token_id, self.pack_to = pad_token_id, pack_to

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if "pack" in features[0]:  # PackedRows: each feature is one row's conversations
            groups = [f["pack"] for f in features]
            features = [c for g in groups for c in g]
            ends = torch.tensor([len(g) for g in groups]).cumsum(0).tolist()
            rows = [list(range(a, b)) for a, b in zip([0] + ends[:-1], ends)]
            if self.pack_to == 0:  # FlexAttention: the micro-batch's rows as one padding-free row
                rows = [list(range(len(features)))]
            return self._layout(features, rows)
        lengths = [len(f["input_ids"]) for f in features]
        if self.pack_to is None:
            rows = [[i] for i in range(len(features))]
        else:
            rows = pack_rows(lengths, self.pack_to or sum(lengths))
        return self._layout(features, rows)

    def _layout(self, features: list[dict], rows: list[list[int]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        doc = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = lengths[i]
                input_ids[r, start:start + n] = torch.tensor(features[i]["input_ids"])
                scored[r, start:start + n] = torch.tensor(features[i]["assistant_mask"])
                scored[r, start] = 0  # a conversation's first token has nothing before it in its own document
                position_ids[r, start:start + n] = torch.arange(n)
                doc[r, start:start + n] = i
                start += n
        batch = plain_score_tensors(input_ids, scored)  # position t−1 predicts token t, inside one document
        batch["score_seq"] = doc.flatten()[batch["score_index"] + 1]
        batch["input_ids"] = input_ids
        batch["num_convs"] = torch.tensor(len(features))
        if self.pack_to is None:
            batch["attention_mask"] = (doc >= 0).long()
        else:
            seg = torch.where(doc >= 0, PROMPT, -1)  # one segment: plain causal attention inside each conversation
            batch.update(position_ids=position_ids, pair_doc=doc, segment=seg)
        return batch


def packing_text(cfg: Config, lengths: list[int], shown: int = 3) -> str:
    """How `qsimpo sft` lays out the conversations of ``lengths`` tokens (file order): with packing, the rows
    PackedRows makes and the first ``shown`` of them; without, the micro-batches of padded rows. Then the positions
    of the whole epoch against one conversation a padded row."""
    b, packing = cfg.train.batch_size, cfg.train.packing
    batches = [lengths[i:i + b] for i in range(0, len(lengths), b)]
    padded = sum(len(batch) * max(batch) for batch in batches)
    if packing == "none":
        return (f"packing: none (train.packing none): {b} conversations a micro-batch, one per row, padded to the "
                f"micro-batch's longest; {len(lengths)} conversations in file order lay out {padded} positions for "
                f"{sum(lengths)} tokens")
    cap, flex = cfg.data.max_length, cfg.model.attn_implementation == "flex_attention"
    rows = pack_rows(lengths, cap)
    widths = [sum(lengths[i] for i in row) for row in rows]
    lines = [f"packing (train.packing {packing}, {cfg.model.attn_implementation}): {len(lengths)} conversations "
             f"({sum(lengths)} tokens) packed into {len(rows)} rows of up to {cap} tokens "
             f"({sum(lengths) / (len(rows) * cap):.0%} full), each conversation attending only to itself, positions "
             f"restarting at 0; a micro-batch is {b} row{'s' * (b != 1)}"
             + (" laid end to end in one padding-free row (flex_attention)" if flex else "")]
    for k, (w, row) in enumerate(zip(widths, rows)):
        if k < shown:
            lines.append(f"  row {k + 1}: {w} = " + " + ".join(str(lengths[i]) for i in row))
    laid = sum(len(g) * max(g) for g in (widths[i:i + b] for i in range(0, len(widths), b))) if not flex else sum(lengths)
    lines.append(f"  {laid} positions laid out for {sum(lengths)} tokens; one conversation per padded row "
                 f"({b} a micro-batch, file order): {padded}")
    return "\n".join(lines)


def make_sft_collator(packing: str, pad_token_id: int, max_length: int, attn: str = "sdpa") -> ConversationCollator:
    if packing == "none":
        return ConversationCollator(pad_token_id)
    return ConversationCollator(pad_token_id, 0 if attn == "flex_attention" else max_length)


def assistant_logps(model, inputs, head_chunk_size: int = 0, compute_dtype=torch.float32) -> torch.Tensor:
    """log p(token | its conversation before it) [T] of every scored (assistant) token of the batch."""
    kwargs = {"input_ids": inputs["input_ids"], "use_cache": False,
              **attention_inputs(inputs, attn_implementation(model), compute_dtype)}
    index, labels = inputs["score_index"], inputs["score_labels"]
    if head_chunk_size:
        with scoring_head(model, index, labels, head_chunk_size):
            return model(**kwargs).logits
    logits = model(**kwargs).logits
    flat = logits.reshape(-1, logits.shape[-1])[index].float()
    return flat.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(flat, dim=-1)


class SFTTrainer(PreferenceTrainer):
    """PreferenceTrainer (sampler, FSDP on CPU, metric logging) with the SFT loss: −mean log-prob of the assistant tokens.

    The mean is over every assistant token of the optimizer step: all its micro-batches (gradient accumulation)
    and, under DDP/FSDP, all processes, as transformers' Trainer and TRL average a causal LM loss. So a step's
    gradient is the same however its conversations are split into micro-batches and processes; a mean per
    micro-batch would weigh the tokens of a short micro-batch above those of a long one.
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the step's token count: no further 1/accumulation

    def __init__(self, *args, **kwargs):
        super().__init__(*args, loss_fn=None, **kwargs)

    def _get_num_items_in_batch(self, batch_samples: list, device) -> torch.Tensor:
        """The assistant tokens of this optimizer step's micro-batches, summed over every process."""
        count = torch.tensor(float(sum(b["score_labels"].numel() for b in batch_samples)), device=device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count[None]).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logps = assistant_logps(model, inputs, self.head_chunk_size, self.compute_dtype)
        if num_items_in_batch is None:  # evaluation: the batch's own mean
            loss = -logps.mean()
        else:  # DDP and FSDP average gradients over processes: × processes undoes that, leaving the token mean
            loss = -logps.sum() / num_items_in_batch * self.accelerator.num_processes
        if not torch.isfinite(loss):
            raise NonFiniteError(f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}; {NON_FINITE_CAUSES}")
        mode = "train" if model.training else "eval"
        self._stash[mode]["tokens"].append(torch.tensor([float(logps.numel())]))
        if mode == "eval":
            self._stash[mode]["loss"].append(loss.detach().float()[None])
        return (loss, {"logps": logps}) if return_outputs else loss


# -------------------------------------------------------------------------------------------- recipe
def check_sft_config(cfg: Config) -> None:
    problems = []
    if cfg.model.sft_adapter:
        problems.append(f"model.sft_adapter = {cfg.model.sft_adapter!r} is for `qsimpo train` (SimPO on top of an SFT "
                        "adapter); `qsimpo sft` trains one from the base: leave it unset")
    if cfg.data.format not in ("auto", "conversational"):
        problems.append(f"data.format = {cfg.data.format!r}: `qsimpo sft` reads conversations (messages, or prompt + "
                        "completion): leave it auto")
    if problems:
        raise ConfigError(problems)


def write_sft_provenance(cfg: Config, output_dir: Path, trainer, tokenizer, summaries: dict) -> None:
    from qsimpo.record import versions
    from qsimpo.run_dir import write_config, write_meta

    write_config(output_dir, cfg)
    write_meta(output_dir, {
        "kind": "sft",
        "base_model": cfg.model.name_or_path,
        "base_model_revision": cfg.model.revision,
        "base_model_gguf_file": cfg.model.gguf_file,
        "quantization": cfg.model.quantization,
        "chat_template": tokenizer.chat_template,  # what every later command renders prompts with
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "data": summaries,
        "versions": versions(),  # qsimpo's own version is versions["qsimpo"], as in every record
    })


def load_conversations(cfg: Config, tokenizer):
    """(train, eval or None, summaries): read and judged before the tokenizer is used, then tokenized."""
    from qsimpo.data import read_source, split_eval
    from qsimpo.data.conversations import sft_report, tokenize_conversations
    from qsimpo.train.recipe import is_main_process

    convs, summary = tokenize_conversations(cfg.data, read_source(cfg.data, conversations=True), tokenizer)
    summaries, held = {"train": summary.to_dict()}, None
    if cfg.data.eval is not None and cfg.data.eval_fraction is None:
        held, eval_summary = tokenize_conversations(cfg.data, read_source(cfg.data, cfg.data.eval, conversations=True),
                                                    tokenizer)
        summaries["eval"] = eval_summary.to_dict()
    elif cfg.data.eval is not None:
        convs, held = split_eval(convs, cfg.data.eval_fraction, cfg.train.seed)
    if is_main_process():
        say(sft_report(summary))
    return convs, held, summaries


def sft(cfg: Config, command: list[str] | None = None):
    """Run SFT as configured; the adapter, its tokenizer files and its provenance land in train.output_dir."""
    from transformers import PrinterCallback, ProgressCallback, set_seed

    from qsimpo.run_dir import CONFIG, METRICS, write_config
    from qsimpo.templates import require_template
    from qsimpo.train.callbacks import (CheckpointMarker, FiniteGradGuard, MetricsJsonl, NothingLeftToTrain, ProgressBar,
                                        SkipFinishedRun)
    from qsimpo.train.model import add_lora, compute_dtype, device_for_rank, load_base, load_tokenizer
    from qsimpo.train.turn_end import TurnEndCheck, turn_end_report
    from qsimpo.train.recipe import (TrainRun, check_output_dir, interrupted, is_main_process, resolve_resume,
                                     resume_command, stop_on_signals, training_arguments)

    check_sft_config(cfg)
    output_dir = Path(cfg.train.output_dir)
    check_output_dir(cfg, output_dir)
    set_seed(cfg.train.seed)
    device = device_for_rank()
    resume_hint = resume_command(command or ["qsimpo", "sft", str(output_dir / CONFIG)], output_dir)
    with stop_on_signals(output_dir, resume_hint) as stop:
        tokenizer = load_tokenizer(cfg.model)
        require_template(tokenizer, cfg.model.name_or_path, "qsimpo sft")
        convs, held, summaries = load_conversations(cfg, tokenizer)
        checkpointed = cfg.train.gradient_checkpointing if cfg.train.gradient_checkpointing != "auto" else True
        model = load_base(cfg.model, device)
        model = add_lora(model, cfg.lora, cfg.model.quantization != "none", checkpointed, cfg.train.seed)

        output_dir.mkdir(parents=True, exist_ok=True)
        if is_main_process():
            write_config(output_dir, cfg)
        resume = resolve_resume(cfg.train.resume_from, output_dir)
        metrics_path = output_dir / METRICS
        if resume is None and is_main_process() and metrics_path.exists():
            metrics_path.unlink()
        args = training_arguments(cfg, output_dir, held is not None, device)
        unit, held_items = "convs", held  # the end-of-turn check reads them unpacked
        if cfg.train.packing != "none":  # train.batch_size counts rows of up to max_length tokens
            convs, unit = PackedRows(convs, cfg.data.max_length), "rows"
            held = PackedRows(held, cfg.data.max_length) if held else held
            if is_main_process():
                say(convs.summary(cfg.data.max_length))
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=convs, eval_dataset=held or None, processing_class=tokenizer,
            data_collator=make_sft_collator(cfg.train.packing, tokenizer.pad_token_id, cfg.data.max_length,
                                            cfg.model.attn_implementation),
            callbacks=[FiniteGradGuard(), MetricsJsonl(metrics_path), SkipFinishedRun(), stop, CheckpointMarker()],
            head_chunk_size=head_chunk_rows(cfg.train.head_chunk_size, model.config.vocab_size),
            compute_dtype=compute_dtype(cfg.model.compute_dtype, device), group_by_length=cfg.train.group_by_length)
        turn_end = TurnEndCheck(model, tokenizer, held_items, args.device)  # the base's side, before training
        if turn_end.warning and is_main_process():
            warn(turn_end.warning)
        trainer.remove_callback(ProgressCallback)
        if cfg.train.progress:
            trainer.remove_callback(PrinterCallback)
            trainer.add_callback(ProgressBar(cfg.train.batch_size * cfg.train.gradient_accumulation_steps * args.world_size,
                                             "sft", unit))
        try:
            trainer.train(resume_from_checkpoint=resume)
        except NothingLeftToTrain:
            stop.loop_done = True
        if stop.requested(args.device):
            step, last = trainer.state.global_step, trainer.state.max_steps
            raise interrupted(f"stopped by {stop.received or 'a signal to another process'} after step {step} of {last}",
                              output_dir, resume_hint)
        if held and not (cfg.train.eval_every and trainer.state.global_step % cfg.train.eval_every == 0):
            trainer.evaluate()
        trainer.save_model(str(output_dir))  # adapter + tokenizer files (the chat template with them)
        checked = turn_end.after(trainer.model)  # and the SFT model's
        if checked is not None:
            summaries["turn_end"] = checked
            if is_main_process():
                say(turn_end_report(checked, checked["token"], tokenizer.eos_token))
        if trainer.is_world_process_zero():
            write_sft_provenance(cfg, output_dir, trainer, tokenizer, summaries)
    return TrainRun(output_dir, trainer)


def sft_command(config: str, overrides: list[str] = (), base: str | None = None, seed: int | None = None,
                out: str | None = None, overwrite: bool = False, trust_remote_code: bool = False, dry_run: bool = False,
                command: list[str] | None = None) -> int:
    """`qsimpo sft`: the config checked as `qsimpo train` checks it (qsimpo.commands), then the recipe above."""
    from qsimpo.commands import check_paths, load
    from qsimpo.console import is_main, say
    from qsimpo.record import write_settings

    cfg = load(config, list(overrides), base=base, seed=seed, out=out, overwrite=overwrite,
               trust_remote_code=trust_remote_code)
    check_paths(cfg)
    if dry_run:
        from qsimpo.config import dump_yaml

        say(f"dry run: nothing was loaded or written. qsimpo sft would write the SFT adapter into "
            f"{cfg.train.output_dir}/, with this config:\n")
        say(dump_yaml(cfg), end="")
        return 0
    run = sft(cfg, command=command)
    if is_main():
        write_settings(run.output_dir, cfg.to_dict(), command)
    say(f"SFT adapter written to {run.output_dir}; SimPO on top: qsimpo train CONFIG --model.sft_adapter {run.output_dir}")
    return 0
