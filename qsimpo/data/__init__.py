"""Preference data: rows on disk -> (prompt, chosen, rejected) -> chat-formatted text -> token ids -> batches.

One pipeline, the one `qsimpo train`, `eval`, `inspect-data` and `plan` use, driven by a DataConfig:

    sources.py   source_table     a .jsonl/.json/.parquet file, a datasets folder or a Hub id -> one Arrow table
                                  of rows with their locations ("file.jsonl:line 12", "folder[test] row 5")
    formats.py   normalise_row    a row -> normalised texts (data.format detected or pinned, data.columns mapped);
                 DataSummary      every dropped row counted in one place (record), judged at once (check), and
                                  when none is left, what the rows look like and the setting to change (diagnosis)
    diagnose.py  diagnose         that diagnosis: the shape the rows look like, and the data.format/data.columns fix
    render.py    render_pair      texts -> prompt text + response texts in the model's chat format (render_prompt:
                                  the prompt alone; turn_end_id: the token the template ends a turn with)
    tokenize.py  tokenize_pair    texts -> prompt ids + response ids, exact boundary, one BOS, one end of turn,
                                  truncation (prompt_ids: a prompt alone, as every command that answers renders it)
    dataset.py   read_source      a whole source through the steps above as cached `datasets` maps; no tokenizer
                                  needed to judge the rows, so bad data stops before anything loads (prompts=True:
                                  the prompts to answer, for `qsimpo pairs`, judged by formats.normalise_prompt)
                 tokenize_source  ... then tokenized: Pairs, a sequence over the memory-mapped table
                 build_dataset    both, for callers that have the tokenizer already
    collate.py   PairCollator     pairs -> input_ids / attention_mask / response_mask, chosen rows then rejected rows

The prompt and each response are tokenized separately, so the boundary between them is exact:
the response mask covers precisely the tokens the model is scored on.
"""

from qsimpo.data.collate import PairCollator
from qsimpo.data.formats import NO_PREFERENCE_VOTES, REASONS, DataError, DataSummary
from qsimpo.data.render import prompt_messages, render_pair, render_prompt, turn_end_id
from qsimpo.data.sources import looks_local
from qsimpo.data.dataset import Pairs, Source, build_dataset, read_source, split_eval, tokenize_source
from qsimpo.data.tokenize import cut_prompt, format_pair, prompt_ids, tokenize_pair

__all__ = ["DataError", "DataSummary", "NO_PREFERENCE_VOTES", "REASONS", "PairCollator", "Pairs", "Source", "build_dataset",
           "cut_prompt", "format_pair", "looks_local", "prompt_ids", "prompt_messages", "read_source", "render_pair",
           "render_prompt", "split_eval", "tokenize_pair", "tokenize_source", "turn_end_id"]
