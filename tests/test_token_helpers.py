"""Tokenizer-level helpers of models/tokens.py that every layer uses: left padding and stop ids."""

from __future__ import annotations

from tunesmith.models.load import load_tokenizer
from tunesmith.models.tokens import left_pad, stop_ids


def test_left_pad_ends_every_prompt_at_the_last_column():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert str(ids.dtype) == "torch.int64" and str(mask.dtype) == "torch.int64"


def test_stop_ids_of_a_chat_tokenizer_whose_eos_ends_the_turn(tiny_model):
    tok = load_tokenizer(tiny_model)  # eos is <|im_end|>; <|eot_id|> and <|end|> are unknown (unk, left out)
    assert stop_ids(tok) == [tok.eos_token_id] == [tok.convert_tokens_to_ids("<|im_end|>")]


def test_stop_ids_add_end_of_turn_tokens_other_than_eos():
    vocab = {"<|eot_id|>": 9, "<|im_end|>": 7}

    class Tok:
        eos_token_id, unk_token_id = 3, 0

        def convert_tokens_to_ids(self, token: str) -> int:
            return vocab.get(token, self.unk_token_id)
    assert stop_ids(Tok()) == [3, 7, 9]
