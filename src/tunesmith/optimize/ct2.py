"""The `ct2` engine: a CTranslate2 model (its own C++ inference runtime, int8 weights and int8
matmuls on x86 and ARM CPUs, int8/float16 on GPUs), converted from the plain merged checkpoint.

Labels are scored as everywhere else in tunesmith: the summed log-probability of each label's
tokens (with its end-of-turn marker) after the prompt, read from CTranslate2's `score_batch`.
CTranslate2 keeps no prompt cache across calls, so each (prompt, label) row is scored whole.
Generation is greedy `generate_batch`, stopping at the tokenizer's end-of-turn tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.data.examples import Example
from tunesmith.models.tokens import stop_ids
from tunesmith.optimize.predictor import Predictor
from tunesmith.tasks.classification import predict_labels
from tunesmith.tasks.predict import Predictions, encode_prompts
from tunesmith.tasks.prompts import label_answers, read_prompt_format

SCORE_ROWS = 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ctranslate2") is not None


def convert(hf_dir: Path, out_dir: Path, quantization: str = "int8") -> None:
    """CTranslate2 conversion of a plain Hugging Face checkpoint (raises ValueError when the
    architecture has no converter)."""
    from ctranslate2.converters import TransformersConverter

    files = [f for f in TOKENIZER_FILES if (Path(hf_dir) / f).is_file()]
    TransformersConverter(str(hf_dir), copy_files=files, low_cpu_mem_usage=True).convert(
        str(out_dir), quantization=quantization, force=True)


def _generator(path: Path):
    import ctranslate2

    if torch.cuda.is_available() and ctranslate2.get_cuda_device_count() > 0:
        return ctranslate2.Generator(str(path), device="cuda", compute_type="int8_float16")
    return ctranslate2.Generator(str(path), device="cpu", compute_type="int8", intra_threads=torch.get_num_threads())


def load_ct2(path: Path, max_new_tokens: int = 64) -> Predictor:
    from tunesmith.models.load import load_tokenizer

    path = Path(path)
    tokenizer = load_tokenizer(path)
    fmt = read_prompt_format(path / "prompt.json")
    generator = _generator(path)

    def run(examples: list[Example], batch_size: int) -> Predictions:
        prompts = encode_prompts(tokenizer, fmt, examples)
        if fmt.labels:
            answers = label_answers(tokenizer, fmt)
            scores = score_labels_ct2(generator, tokenizer, prompts, answers)
            return Predictions(*predict_labels(scores, fmt.labels))
        return Predictions([tokenizer.decode(ids, skip_special_tokens=True).strip()
                            for ids in generate_ct2(generator, tokenizer, prompts, [max_new_tokens] * len(prompts))])

    def complete(prompts: list[list[int]], limits: list[int]) -> list[list[int]]:
        return generate_ct2(generator, tokenizer, prompts, limits)
    return Predictor(run, None, fmt, tokenizer, complete=complete)


def score_labels_ct2(generator, tokenizer, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
    """(N, L) summed log-probabilities of each answer after each prompt."""
    rows = [tokenizer.convert_ids_to_tokens(p + a) for p in prompts for a in answers]
    # Rows per call: larger batches were slower on CPU and took gigabytes (measured: 16 rows 1.64
    # examples/s and 8 labels, 128 rows 0.87 examples/s and 6 GB peak).
    results = generator.score_batch(rows, max_batch_size=SCORE_ROWS, max_input_length=0)
    # log_probs[i] is the log-probability of token i + 1 given the tokens before it.
    scores = [sum(r.log_probs[-len(a):]) for r, a in zip(results, answers * len(prompts))]
    return torch.tensor(scores, dtype=torch.float32).view(len(prompts), len(answers))  # (N, L)


def generate_ct2(generator, tokenizer, prompts: list[list[int]], limits: list[int]) -> list[list[int]]:
    """Greedy continuations (token ids, without the stop token) of each prompt, at most limits[i] tokens."""
    stops = tokenizer.convert_ids_to_tokens(stop_ids(tokenizer))
    out = []
    for limit in sorted(set(limits)):  # one call per distinct max_tokens: the requests of one batch
        chosen = [i for i, n in enumerate(limits) if n == limit]
        results = generator.generate_batch([tokenizer.convert_ids_to_tokens(prompts[i]) for i in chosen],
                                           max_length=limit, sampling_topk=1, include_prompt_in_result=False,
                                           end_token=stops)
        out += [(i, r.sequences_ids[0]) for i, r in zip(chosen, results)]
    return [ids for _, ids in sorted(out)]
