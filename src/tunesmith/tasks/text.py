"""task.type text (continued pre-training on raw documents): token ids and fixed-length chunks.

A document becomes the ids the model would have seen in pre-training: its BOS when the tokenizer
adds one to every sequence (Llama does; SmolLM2 and Qwen do not), the text tokenized literally (a
control-token string inside a document stays plain text), then the EOS that ends a document, so
the model learns where documents stop. A document longer than task.max_length is split into
chunks rather than truncated; neighbouring chunks overlap by one token, so every token after the
document's first is predicted exactly once (a chunk's first token is never a target).
"""

from __future__ import annotations

from tunesmith.models.tokens import adds_bos, text_ids


def document_ids(tokenizer, text: str) -> list[int]:
    """[BOS if the model expects it] + literal tokens of `text` + [EOS]."""
    head = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return head + text_ids(tokenizer, text) + tail


def chunk_ids(ids: list[int], max_length: int) -> list[list[int]]:
    """Windows of at most `max_length` ids with a stride of max_length - 1 (one token of overlap).

    The overlap carries the last token of one chunk as the context of the next chunk's first
    prediction, so the chunks' targets (all tokens but each chunk's first) cover ids[1:] exactly once.
    """
    if max_length < 2:
        raise ValueError("a chunk needs at least two tokens (one context, one target)")
    if len(ids) <= max_length:
        return [list(ids)]
    stride = max_length - 1
    return [ids[start:start + max_length] for start in range(0, len(ids) - 1, stride)]


def text_chunks(tokenizer, text: str, max_length: int) -> list[list[int]]:
    """The chunks of one document (see `document_ids`, `chunk_ids`)."""
    return chunk_ids(document_ids(tokenizer, text), max_length)
