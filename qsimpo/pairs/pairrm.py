"""PairRM (LLM-Blender's pairwise ranker, ``llm-blender/PairRM``), the judge of the SimPO paper's v0.1 data, on
transformers' own DebertaV2Model: the checkpoint as LLM-Blender writes it, and its ranking, without llm-blender.

    qsimpo pairs prompts.jsonl --model adapters/sft --scorer llm-blender/PairRM --out pairs.jsonl

The checkpoint (LLM-Blender 0.0.2, ``Blender.loadranker``): ``config.json`` is LLM-Blender's RankerConfig
(``ranker_type: pairranker``, ``model_name`` the backbone, ``source_maxlength`` 1224, ``candidate_maxlength`` 412,
``n_tasks``, ``drop_out``, ``fp16``), ``pytorch_model.bin`` (or ``model.safetensors``) the state dict of its
``CrossCompareReranker``: ``pretrained_model.*`` (the DebertaV2Model, its embeddings resized to the tokenizer with
the four prefix tokens added) and ``head_layer.{1,4}`` (Dropout, Linear(2H, H), Tanh, Dropout, Linear(H, n_tasks)).

Ranking the N answers to one prompt is LLM-Blender's ``Blender.rank(..., return_scores=True)`` with one prompt per
batch: the collator tokenizes ``<|source|>`` + prompt cut to ``source_maxlength`` tokens and ``<|candidate|>`` +
answer cut to ``candidate_maxlength`` + half of what the prompt left unused (right truncation, [CLS] ... [SEP] each);
``_full_predict`` runs every ordered pair (i, j), i != j, as ``[CLS]<|source|>x[SEP][CLS]<|candidate1|>a_i[SEP]
[CLS]<|candidate2|>a_j[SEP]``, where M[i, j] = mean over tasks of head(h_source, h_cand1) - head(h_source, h_cand2)
read at the three prefix tokens of the last layer; and ``get_scores_from_cmps`` scores answer i as
mean_j (M[i, j] - M[j, i]) (the diagonal is 0). Both orders of every pair count, so the scores do not depend on
the order the answers are given in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qsimpo.errors import InputNotFound, UsageError
from qsimpo.pairs import judges

SOURCE, CAND1, CAND2, CAND = "<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>"
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
# microsoft/deberta-v3-large's config.json: LLM-Blender builds PairRM's backbone from it (``model_name``), and
# PairRM's folder does not hold it. Written here so that a PairRM folder loads offline; vocab_size is then taken
# from the checkpoint (LLM-Blender resized the embeddings to the tokenizer with the prefix tokens).
DEBERTA_V3_LARGE = dict(model_type="deberta-v2", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, hidden_act="gelu", hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=0,
                        initializer_range=0.02, layer_norm_eps=1e-7, relative_attention=True, max_relative_positions=-1,
                        position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
                        position_biased_input=False, pad_token_id=0, vocab_size=128100)
# Buffers that transformers of 2023 saved with the weights and today's DebertaV2Model no longer keeps.
OLD_BUFFERS = ("pretrained_model.embeddings.position_ids",)


def ranker_config(name: str) -> dict | None:
    """The RankerConfig of ``name`` (a folder or Hub id) when it is LLM-Blender's pairwise ranker, else None."""
    from qsimpo.run_dir import fetch

    path = fetch(name, "config.json")
    if path is None:
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("ranker_type") == "pairranker" else None


def source_text(prompt: list[dict]) -> str:
    """The text PairRM is asked about: the user's message, as the paper's pipeline passes it; a longer conversation
    as "ROLE: text" lines (LLM-Blender has no single-prompt form for one)."""
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt)


class PairRMModel(nn.Module):
    """LLM-Blender's CrossCompareReranker reduced to what ranking runs, with its parameter names."""

    def __init__(self, backbone_config, n_tasks: int, drop_out: float):
        from transformers import DebertaV2Model

        super().__init__()
        self.pretrained_model = DebertaV2Model(backbone_config)
        hidden = backbone_config.hidden_size
        self.head_layer = nn.Sequential(nn.Dropout(drop_out), nn.Linear(2 * hidden, hidden), nn.Tanh(),
                                        nn.Dropout(drop_out), nn.Linear(hidden, n_tasks))

    def forward(self, input_ids, attention_mask, positions):
        """M[i, j] of each row: ``positions`` [rows, 3] are the <|source|>, <|candidate1|>, <|candidate2|> tokens."""
        h = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(h.shape[0], device=h.device)
        source, c1, c2 = (h[rows, positions[:, k]] for k in range(3))
        left = self.head_layer(torch.cat([source, c1], dim=-1))
        right = self.head_layer(torch.cat([source, c2], dim=-1))
        return (left - right).mean(dim=-1)


class PairRM:
    """The scorer: each prompt's answers ranked together, the scores LLM-Blender's rank(return_scores=True) gives."""

    kind = "pairrm"

    def __init__(self, name: str, device: str, config: dict | None = None, max_rows: int | None = None):
        from transformers import AutoConfig, AutoTokenizer, DebertaV2Config

        self.spec, self.device, self.max_rows = name, device, max_rows
        config = config or ranker_config(name)
        if config is None:
            raise UsageError(f"--scorer pairrm:{name}: no PairRM here (its config.json does not say ranker_type "
                             "\"pairranker\"); give llm-blender/PairRM or a folder holding its files")
        folder = self._folder(name)
        weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
        if weights is None:
            raise InputNotFound(f"--scorer {name}: a PairRM config.json without its weights (no {' or '.join(WEIGHT_FILES)} "
                                f"in {folder})")
        state = (torch.load(weights, map_location="cpu", weights_only=True) if weights.suffix == ".bin"
                 else __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(weights)))
        for key in OLD_BUFFERS:
            state.pop(key, None)
        backbone = config.get("model_name") or "microsoft/deberta-v3-large"
        if backbone.rstrip("/").endswith("microsoft/deberta-v3-large"):
            backbone_config = DebertaV2Config(**{k: v for k, v in DEBERTA_V3_LARGE.items() if k != "model_type"})
        else:
            backbone_config = AutoConfig.from_pretrained(backbone)
        embeddings = state.get("pretrained_model.embeddings.word_embeddings.weight")
        if embeddings is None:
            raise UsageError(f"--scorer {name}: {weights.name} is not a PairRM state dict (no "
                             "pretrained_model.embeddings.word_embeddings.weight)")
        backbone_config.vocab_size = embeddings.shape[0]
        # the tokenizer: the folder's (saved with the prefix tokens) or, as LLM-Blender loads it, the backbone's
        has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "spm.model"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder) if has_tokenizer else backbone)
        self.tokenizer.add_tokens([SOURCE, CAND1, CAND2, CAND])  # LLM-Blender's collator adds them (no-op when saved)
        if len(self.tokenizer) != backbone_config.vocab_size:
            raise UsageError(f"--scorer {name}: its tokenizer has {len(self.tokenizer)} tokens with the PairRM prefixes "
                             f"but the checkpoint's embeddings have {backbone_config.vocab_size} rows: not the tokenizer "
                             "it was trained with")
        self.ids = {t: self.tokenizer.convert_tokens_to_ids(t) for t in (SOURCE, CAND1, CAND2, CAND)}
        self.model = PairRMModel(backbone_config, int(config.get("n_tasks", 1)), float(config.get("drop_out", 0.05)))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UsageError(f"--scorer {name}: {weights.name} does not fit PairRM's layout (missing: "
                             f"{', '.join(missing[:5]) or 'none'}; unexpected: {', '.join(unexpected[:5]) or 'none'})")
        # LLM-Blender runs the ranker in fp16 on a GPU when its config says fp16, in fp32 elsewhere
        half = torch.device(device).type == "cuda" and config.get("fp16", True)
        self.model.to(device, torch.float16 if half else torch.float32).eval()
        self.backbone_config, self.dtype_bytes = backbone_config, 2 if half else 4
        self.source_max = int(config.get("source_maxlength") or 1224)
        self.candidate_max = int(config.get("candidate_maxlength") or 412)
        self.scored = self.truncated_prompts = self.truncated_answers = 0
        self.seconds = 0.0

    @staticmethod
    def _folder(name: str) -> Path:
        local = Path(name).expanduser()
        if local.is_dir():
            return local
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, allow_patterns=["*.json", "*.bin", "*.safetensors", "spm.model"]))
        except Exception as e:
            raise InputNotFound(f"--scorer {name}: could not download PairRM's files ({type(e).__name__}: {e})") from None

    def _clean(self, text: str) -> str:
        # LLM-Blender turns [SEP] in a text into a space; a prefix token inside a text would make its own forward
        # read the wrong positions (or fail), so those become spaces too
        for token in (self.tokenizer.sep_token, SOURCE, CAND1, CAND2, CAND):
            text = text.replace(token, " ")
        return text

    def _encode(self, text: str, limit: int) -> tuple[list[int], bool]:
        """[CLS] text [SEP] cut on the right to ``limit`` tokens, as the tokenizer's truncation cuts; and whether it was."""
        ids = self.tokenizer(text)["input_ids"]
        if len(ids) <= limit:
            return ids, False
        return ids[:limit - 1] + ids[-1:], True

    def encode(self, source: str, answers: list[str]) -> tuple[list[int], list[list[int]]]:
        """The collator's token ids of one prompt and its answers (counting what was cut)."""
        src, cut = self._encode(SOURCE + self._clean(source), self.source_max)
        self.truncated_prompts += cut
        limit = self.candidate_max + (self.source_max - len(src)) // 2  # the prompt's unused room, shared by two answers
        cands = []
        for answer in answers:
            ids, cut = self._encode(CAND + self._clean(answer), limit)
            self.truncated_answers += cut
            cands.append(ids)
        return src, cands

    def _row(self, src: list[int], a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
        one = [self.ids[CAND1] if t == self.ids[CAND] else t for t in a]
        two = [self.ids[CAND2] if t == self.ids[CAND] else t for t in b]
        return src + one + two, [src.index(self.ids[SOURCE]), len(src) + one.index(self.ids[CAND1]),
                                 len(src) + len(one) + two.index(self.ids[CAND2])]

    @torch.no_grad()
    def compare(self, rows: list[tuple[list[int], list[int]]]) -> list[float]:
        """M[i, j] of each (ids, positions) row, in passes sized by memory."""
        cost = lambda n, length: n * judges.activation_bytes(self.backbone_config, length, self.dtype_bytes, True)  # noqa: E731
        out = [0.0] * len(rows)
        pad = self.tokenizer.pad_token_id
        for part in judges.batches([len(r[0]) for r in rows], cost, judges.budget(self.device), self.max_rows):
            longest = max(len(rows[i][0]) for i in part)
            ids = torch.tensor([rows[i][0] + [pad] * (longest - len(rows[i][0])) for i in part], device=self.device)
            mask = torch.tensor([[1] * len(rows[i][0]) + [0] * (longest - len(rows[i][0])) for i in part],
                                device=self.device)
            positions = torch.tensor([rows[i][1] for i in part], device=self.device)
            for i, v in zip(part, self.model(ids, mask, positions).float().tolist()):
                out[i] = v
        return out

    def rank(self, prompts: list[list[dict]], answer_groups: list[list[str]]) -> list[list[float]]:
        """The scores of each prompt's answers (higher is better)."""
        rows, where = [], []
        for g, (prompt, answers) in enumerate(zip(prompts, answer_groups)):
            src, cands = self.encode(source_text(prompt), answers)
            for i in range(len(answers)):
                for j in range(len(answers)):
                    if i != j:
                        rows.append(self._row(src, cands[i], cands[j]))
                        where.append((g, i, j))
        values = self.compare(rows)
        matrices = [torch.zeros(len(a), len(a), dtype=torch.float32) for a in answer_groups]
        for (g, i, j), v in zip(where, values):
            matrices[g][i, j] = v
        return [(m - m.T).mean(dim=-1).tolist() for m in matrices]

    def __call__(self, prompts: list[list[dict]], responses: list[str], where: list[str],
                 sizes: list[int] | None = None) -> list[float]:
        """Scores of ``responses``, each ranked against the other answers to its prompt: ``sizes`` answers at a time,
        or (None) each run of consecutive answers to the same prompt."""
        import time

        from qsimpo.pairs.scorers import check_scores

        t0 = time.perf_counter()
        spans = judges.groups(prompts, sizes)
        ranked = self.rank([prompts[s.start] for s in spans], [responses[s.start:s.stop] for s in spans])
        values = [v for group in ranked for v in group]
        self.seconds += time.perf_counter() - t0
        self.scored += len(values)
        return check_scores(self.spec, values, prompts, responses, where)

    def cut_line(self) -> str | None:
        """What did not fit, as the end-of-run line says it."""
        if not (self.truncated_prompts or self.truncated_answers):
            return None
        return (f"PairRM cut {self.truncated_prompts} prompts to {self.source_max} tokens and {self.truncated_answers} "
                f"answers to its candidate length ({self.candidate_max} + half the prompt's unused room), as LLM-Blender "
                "does: it judged their beginnings")
