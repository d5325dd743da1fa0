"""LLM-Blender 0.0.2's PairRM ranking (llm_blender/pair_ranker/{collator,ranker}.py, blender/blender.py,
gpt_eval/utils.py; Apache-2.0), vendored as the reference qsimpo's PairRM must equal: the code paths that
``Blender.loadranker`` + ``Blender.rank(inputs, candidates, return_scores=True, batch_size=1)`` take for a
``pairranker`` checkpoint with a DeBERTa backbone, kept as written (training and encoder-decoder branches left out),
so that a test needs neither llm-blender (which does not import under transformers 5) nor a network.

Also: ``write_pairrm``, a tiny random checkpoint in the layout ``Blender.loadranker`` reads (config.json as a
RankerConfig, pytorch_model.bin as CrossCompareReranker's state dict, the tokenizer with the four prefix tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

# llm_blender/pair_ranker/config.py RankerConfig's keys, with PairRM's values (llm-blender/PairRM's config.json)
RANKER_CONFIG = {"ranker_type": "pairranker", "model_type": "deberta", "model_name": "microsoft/deberta-v3-large",
                 "cache_dir": None, "load_checkpoint": None, "source_maxlength": 1224, "candidate_maxlength": 412,
                 "n_tasks": 1, "num_pos": 5, "num_neg": 5, "sub_sampling_mode": "all_pair", "sub_sampling_ratio": 0.4,
                 "loss_type": "instructgpt", "reduce_type": "linear", "inference_mode": "bubble", "drop_out": 0.05,
                 "fp16": True, "device": None}
WORDS = ("the a is of and to in what how why answer question water sky blue green cold hot because it not very "
         "much more less good bad yes no").split()


def tiny_tokenizer():
    """A DeBERTa-v2 (Unigram) tokenizer with DeBERTa-v3's special-token ids ([PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3)."""
    from transformers import DebertaV2Tokenizer

    vocab = [("[PAD]", 0.0), ("[CLS]", 0.0), ("[SEP]", 0.0), ("[UNK]", 0.0)]
    vocab += [("\u2581" + w, -2.0) for w in WORDS] + [("\u2581", -3.0)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?.,!'0123456789"] + [("[MASK]", 0.0)]
    return DebertaV2Tokenizer(vocab=vocab)


def write_pairrm(folder: Path, hidden: int = 32, layers: int = 2, heads: int = 4, source_max: int = 1224,
                 candidate_max: int = 412, seed: int = 0) -> Path:
    """``folder``/backbone: a tiny DeBERTa-v3-shaped model + tokenizer (what microsoft/deberta-v3-large is to PairRM);
    ``folder``/pairrm: the ranker, written as LLM-Blender's training wrote PairRM (its model_name the backbone)."""
    from transformers import DebertaV2Config, DebertaV2Model

    backbone, ranker = folder / "backbone", folder / "pairrm"
    tok = tiny_tokenizer()
    config = DebertaV2Config(vocab_size=128, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=2 * hidden, max_position_embeddings=512, type_vocab_size=0,
                             relative_attention=True, max_relative_positions=-1, position_buckets=256,
                             norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
                             position_biased_input=False, layer_norm_eps=1e-7, hidden_dropout_prob=0.1,
                             attention_probs_dropout_prob=0.1, initializer_range=0.5)
    torch.manual_seed(seed)
    DebertaV2Model(config).save_pretrained(backbone)
    tok.save_pretrained(backbone)
    cfg = dict(RANKER_CONFIG, model_name=str(backbone), source_maxlength=source_max, candidate_maxlength=candidate_max)
    reranker, tok = build_reference(cfg)  # LLM-Blender's build: prefixes added, embeddings resized, a random head
    for p in reranker.head_layer.parameters():
        nn.init.normal_(p, std=0.5)  # a head far from zero: scores that differ
    ranker.mkdir(parents=True)
    (ranker / "config.json").write_text(json.dumps(cfg, indent=4))
    state = reranker.state_dict()
    state["pretrained_model.embeddings.position_ids"] = torch.arange(512).expand((1, -1))  # as transformers 4.30 saved
    torch.save(state, ranker / "pytorch_model.bin")
    tok.save_pretrained(ranker)
    return ranker


# ---- llm_blender/pair_ranker/model_util.py build_tokenizer + build_ranker("pairranker", "deberta", ...) ----
def build_reference(cfg: dict):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg["model_name"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    collator = CrossCompareCollator(cfg["source_maxlength"], tokenizer, cfg["candidate_maxlength"])
    model = AutoModel.from_pretrained(cfg["model_name"])
    model.config.out_hidden_state_size = model.config.hidden_size
    model.resize_token_embeddings(len(tokenizer))
    reranker = CrossCompareReranker(model, cfg, tokenizer)
    reranker.collator = collator
    return reranker.eval(), tokenizer


def load_reference(folder: Path):
    """blender_utils.load_ranker: build from config.json, then load_state_dict(strict=False) of pytorch_model.bin."""
    cfg = json.loads((folder / "config.json").read_text())
    reranker, tok = build_reference(cfg)
    result = reranker.load_state_dict(torch.load(folder / "pytorch_model.bin", map_location="cpu"), strict=False)
    assert not result.missing_keys, result.missing_keys
    return reranker.float().eval()


def rank_reference(reranker, inputs: list[str], candidates: list[list[str]]) -> np.ndarray:
    """Blender.rank(inputs, candidates, return_scores=True, batch_size=1)."""
    scores = []
    with torch.no_grad():
        for source, cands in zip(inputs, candidates):
            batch = reranker.collator([{"index": 0, "source": source, "candidates": cands}])
            batch = {k: v for k, v in batch.items() if v is not None}
            outputs = reranker._full_predict(**batch)
            scores.append(get_scores_from_cmps(outputs["logits"].detach().cpu().numpy()))
    return np.concatenate(scores, axis=0)


# ---- llm_blender/gpt_eval/utils.py ----
def get_scores_from_cmps(cmp_results, policy="max_logits"):
    bz, c, _ = cmp_results.shape
    scores = np.zeros((bz, c), dtype=np.float32)
    for i in range(bz):
        scores[i] = (cmp_results[i] - cmp_results[i].T).mean(axis=-1)
    return scores


# ---- llm_blender/pair_ranker/collator.py ----
def encode_texts(texts, tokenizer, max_length=None):
    p = tokenizer(texts, max_length=max_length, padding="max_length", return_tensors="pt", truncation=True)
    return p["input_ids"], p["attention_mask"]


def encode_batch_text(batch_texts, tokenizer, max_length=None):
    encoded_ids, encoded_masks = [], []
    for texts in batch_texts:
        ids, mask = encode_texts(texts, tokenizer, max_length)
        encoded_ids.append(ids[None])
        encoded_masks.append(mask[None])
    return torch.cat(encoded_ids, dim=0), torch.cat(encoded_masks, dim=0)


class CrossCompareCollator:
    def __init__(self, source_maxlength, tokenizer, candidate_maxlength):
        self.tokenizer = tokenizer
        self.source_maxlength = source_maxlength
        self.candidate_maxlength = candidate_maxlength
        self.sep_token = tokenizer.sep_token if tokenizer.sep_token is not None else tokenizer.eos_token
        self.source_prefix = "<|source|>"
        self.candidate1_prefix = "<|candidate1|>"
        self.candidate2_prefix = "<|candidate2|>"
        self.candidate_prefix = "<|candidate|>"
        self.mannually_add_sep_token = len(self.tokenizer.encode(self.sep_token)) == 1
        assert not self.mannually_add_sep_token  # DeBERTa: encode("[SEP]") is [CLS] [SEP] [SEP]
        tokenizer.add_tokens([self.source_prefix, self.candidate1_prefix, self.candidate2_prefix, self.candidate_prefix])
        tokenizer.source_prefix_id = tokenizer.convert_tokens_to_ids(self.source_prefix)
        tokenizer.cand1_prefix_id = tokenizer.convert_tokens_to_ids(self.candidate1_prefix)
        tokenizer.cand2_prefix_id = tokenizer.convert_tokens_to_ids(self.candidate2_prefix)
        tokenizer.cand_prefix_id = tokenizer.convert_tokens_to_ids(self.candidate_prefix)

    def __call__(self, batch):
        batch_source = [self.source_prefix + b["source"] for b in batch]
        batch_candidates = [[self.candidate_prefix + cand for cand in b["candidates"]] for b in batch]
        batch_source = [s.replace(self.sep_token, " ") for s in batch_source]
        batch_candidates = [[cand.replace(self.sep_token, " ") for cand in cands] for cands in batch_candidates]
        source_ids, source_masks = encode_texts(batch_source, self.tokenizer, self.source_maxlength)
        valid_positions = source_masks.any(dim=0)
        source_ids = source_ids[:, valid_positions]
        source_masks = source_masks[:, valid_positions]
        remaining_length = self.source_maxlength - valid_positions.sum().item()
        candidate_ids, candidate_masks = encode_batch_text(batch_candidates, self.tokenizer,
                                                           self.candidate_maxlength + remaining_length // 2)
        cand_valid_positions = candidate_masks.reshape(-1, candidate_masks.shape[-1]).any(dim=0)
        candidate_ids = candidate_ids[:, :, cand_valid_positions]
        candidate_masks = candidate_masks[:, :, cand_valid_positions]
        return {"source_ids": source_ids, "source_attention_mask": source_masks, "candidate_ids": candidate_ids,
                "candidate_attention_mask": candidate_masks, "scores": None}


# ---- llm_blender/pair_ranker/ranker.py CrossCompareReranker (inference) ----
class CrossCompareReranker(nn.Module):
    def __init__(self, pretrained_model, args, tokenizer):
        super().__init__()
        self.n_tasks = args["n_tasks"]
        self.drop_out = args["drop_out"]
        self.pretrained_model = pretrained_model
        self.hidden_size = pretrained_model.config.out_hidden_state_size
        self.sep_token_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self.tokenizer = tokenizer
        self.head_layer = nn.Sequential(
            nn.Dropout(self.drop_out),
            nn.Linear(2 * self.hidden_size, 1 * self.hidden_size),
            nn.Tanh(),
            nn.Dropout(self.drop_out),
            nn.Linear(1 * self.hidden_size, self.n_tasks),
        )
        self.sigmoid = nn.Sigmoid()

    def reduce(self, source_encs, cand1_encs, cand2_encs):
        source_cand1_encs = torch.cat([source_encs, cand1_encs], dim=-1)
        source_cand2_encs = torch.cat([source_encs, cand2_encs], dim=-1)
        return self.head_layer(source_cand1_encs), self.head_layer(source_cand2_encs)

    def _forward(self, source_ids, source_attention_mask, cand1_ids, cand1_attention_mask, cand2_ids,
                 cand2_attention_mask):
        cand1_ids = cand1_ids.clone()
        cand2_ids = cand2_ids.clone()
        cand1_idxs = torch.where(cand1_ids == self.tokenizer.cand_prefix_id)
        cand2_idxs = torch.where(cand2_ids == self.tokenizer.cand_prefix_id)
        cand1_ids[cand1_idxs] = self.tokenizer.cand1_prefix_id
        cand2_ids[cand2_idxs] = self.tokenizer.cand2_prefix_id
        input_ids, attention_mask = self.cat_ids(source_ids, source_attention_mask, cand1_ids, cand1_attention_mask,
                                                 cand2_ids, cand2_attention_mask)
        keep_column_mask = attention_mask.ne(0).any(dim=0)
        input_ids = input_ids[:, keep_column_mask]
        attention_mask = attention_mask[:, keep_column_mask]
        outputs = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        encs = outputs.hidden_states[-1]
        source_idxs = torch.where(input_ids == self.tokenizer.source_prefix_id)
        source_encs = encs[source_idxs[0], source_idxs[1], :]
        cand1_idxs = torch.where(input_ids == self.tokenizer.cand1_prefix_id)
        cand1_encs = encs[cand1_idxs[0], cand1_idxs[1], :]
        cand2_idxs = torch.where(input_ids == self.tokenizer.cand2_prefix_id)
        cand2_encs = encs[cand2_idxs[0], cand2_idxs[1], :]
        left_pred_scores, right_pred_scores = self.reduce(source_encs, cand1_encs, cand2_encs)
        return {"logits": (left_pred_scores - right_pred_scores).mean(dim=-1)}

    def cat_ids(self, ids1, masks1, ids2, masks2, ids3, masks3):
        ori_shape = ids1.shape[:-1]
        ids1, ids2, ids3 = (x.reshape(-1, x.shape[-1]) for x in (ids1, ids2, ids3))
        masks1, masks2, masks3 = (x.reshape(-1, x.shape[-1]) for x in (masks1, masks2, masks3))
        bz = ids1.shape[0]
        sep_token_idx1 = ids1.eq(self.sep_token_id).nonzero()[:, 1].reshape(bz, -1)[:, -1]
        sep_token_idx2 = ids2.eq(self.sep_token_id).nonzero()[:, 1].reshape(bz, -1)[:, -1]
        sep_token_idx3 = ids3.eq(self.sep_token_id).nonzero()[:, 1].reshape(bz, -1)[:, -1]
        cat_ids, cat_masks = [], []
        for i in range(bz):
            cat_ids.append(torch.cat([
                ids1[i, :sep_token_idx1[i] + 1], ids2[i, :sep_token_idx2[i] + 1], ids3[i, :sep_token_idx3[i] + 1],
                ids1[i, sep_token_idx1[i] + 1:], ids2[i, sep_token_idx2[i] + 1:], ids3[i, sep_token_idx3[i] + 1:],
            ], dim=0))
            cat_masks.append(torch.cat([
                masks1[i, :sep_token_idx1[i] + 1], masks2[i, :sep_token_idx2[i] + 1], masks3[i, :sep_token_idx3[i] + 1],
                masks1[i, sep_token_idx1[i] + 1:], masks2[i, sep_token_idx2[i] + 1:], masks3[i, sep_token_idx3[i] + 1:],
            ], dim=0))
        return torch.stack(cat_ids).reshape(ori_shape + (-1,)), torch.stack(cat_masks).reshape(ori_shape + (-1,))

    def _full_predict(self, source_ids, source_attention_mask, candidate_ids, candidate_attention_mask, scores=None):
        batch_size, n_candidates, _ = candidate_ids.shape
        compare_results = torch.zeros(batch_size, n_candidates, n_candidates, device=source_ids.device)
        for i in range(n_candidates):
            for j in range(n_candidates):
                if i == j:
                    continue
                preds = self._forward(source_ids, source_attention_mask, candidate_ids[:, i],
                                      candidate_attention_mask[:, i], candidate_ids[:, j],
                                      candidate_attention_mask[:, j])["logits"]
                compare_results[:, i, j] = preds
        return {"logits": compare_results}
