"""Encoding raw documents for training (task.type text): loss on every token, no prompt.

Each chunk of a document (tasks/text.py) becomes one training sequence whose prompt is empty,
so `batching.collate` labels every token and `batching.collate_packed` packs chunks of several
documents into one row with attention kept inside each chunk.
"""

from __future__ import annotations

from tunesmith.data.examples import Example
from tunesmith.tasks.prompts import PromptFormat
from tunesmith.tasks.text import text_chunks
from tunesmith.train.batching import Encoded


def encode_text(tokenizer, fmt: PromptFormat, examples: list[Example]) -> list[Encoded]:
    """One Encoded per chunk of each document (`Example.input`), n_prompt 0, the row's weight kept.

    Nothing is truncated: a document longer than task.max_length yields several chunks.
    """
    return [Encoded(chunk, 0, weight=ex.weight)
            for ex in examples for chunk in text_chunks(tokenizer, ex.input, fmt.max_length)]

