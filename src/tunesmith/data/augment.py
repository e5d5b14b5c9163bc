"""Training-set augmentation: EDA operations, character noise, model paraphrases, oversampling.

Every augmented row is a new Example with `augmented` naming how it was made and `source`
pointing at the row it came from; augmentation runs after splitting, on the training split only,
so no augmented text reaches validation or test. Only the input text changes; the label or
answer is the original's. Chat rows (whose input is part of a conversation) are not augmented.

EDA (Wei & Zou, 2019) needs synonyms; with no thesaurus available offline they come from the
nearest whole-word neighbours in all-MiniLM-L6-v2's token embedding table (cosine >= 0.4),
which gives related words (inflections, near-synonyms) rather than curated synonyms.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from functools import lru_cache

from tunesmith.config import AugmentConfig
from tunesmith.data.examples import Example

_KEYBOARD = "qwertyuiopasdfghjklzxcvbnm"


def augment(train: list[Example], cfg: AugmentConfig, paraphrase=None) -> list[Example]:
    """The new rows for `train` (not including the originals).

    Args:
        paraphrase: callable(texts, n) -> list of n paraphrase lists; required when cfg.paraphrases > 0.
    """
    if not cfg.enabled:
        return []
    rng = random.Random(cfg.seed)
    rows = [e for e in train if e.messages is None]
    new: list[Example] = []
    for e in rows:
        for k in range(cfg.eda):
            new.append(_variant(e, eda(e.input, cfg.eda_rate, rng), f"eda:{k + 1}"))
        for k in range(cfg.char_noise):
            new.append(_variant(e, char_noise(e.input, cfg.char_noise_rate, rng), f"char_noise:{k + 1}"))
    if cfg.paraphrases and rows:
        for e, texts in zip(rows, paraphrase([e.input for e in rows], cfg.paraphrases)):
            new += [_variant(e, t, f"paraphrase:{k + 1}") for k, t in enumerate(texts) if t.strip()]
    if cfg.oversample_to:
        new += oversample(train, cfg.oversample_to, rng)
    # Drop variants that came out identical to their original (e.g. a one-word text).
    originals = {e.source: e.input for e in train}
    return [n for n in new if n.input.strip() and (n.augmented == "oversample" or n.input != originals.get(n.source))]


def _variant(e: Example, text: str, how: str) -> Example:
    return replace(e, input=text, augmented=how, record=None)


def eda(text: str, rate: float, rng: random.Random) -> str:
    """One EDA edit of `text`: synonym replacement, random insertion, swap or deletion."""
    words = text.split()
    if len(words) < 2:
        return text
    n = max(1, round(rate * len(words)))
    op = rng.choice(("synonym", "insert", "swap", "delete"))
    if op == "delete":  # n distinct words (never all of them): one pass, not a list deletion each
        dropped = set(rng.sample(range(len(words)), min(n, len(words) - 1)))
        return " ".join(w for i, w in enumerate(words) if i not in dropped)
    before: dict[int, list[str]] = {}  # inserted synonyms, by the slot (0..len) they go before
    for _ in range(n):
        if op == "swap":
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
            continue
        i = rng.randrange(len(words))
        options = synonyms(words[i].lower().strip(".,!?;:"))
        if options:
            word = rng.choice(options)
            if op == "synonym":
                words[i] = word
            else:
                before.setdefault(rng.randrange(len(words) + 1), []).append(word)
    if not before:
        return " ".join(words)
    return " ".join(w for slot in range(len(words) + 1) for w in before.get(slot, []) + words[slot:slot + 1])


def char_noise(text: str, rate: float, rng: random.Random) -> str:
    """Typos: about `rate` of the letters swapped with a neighbour, dropped, doubled or mistyped."""
    chars = list(text)
    letters = [i for i, c in enumerate(chars) if c.isalpha()]
    # Each position's edit is recorded as what it becomes ("" dropped, twice doubled), then the text is
    # joined once: deleting from and inserting into the list was quadratic on long texts.
    out: list[str] = chars.copy()
    for i in sorted(rng.sample(letters, min(len(letters), max(1, round(rate * len(letters))))), reverse=True):
        op = rng.choice(("swap", "drop", "double", "key"))
        if op == "swap" and i + 1 < len(chars):
            out[i], out[i + 1] = out[i + 1], out[i]
        elif op == "drop":
            out[i] = ""
        elif op == "double":
            out[i] = out[i] * 2
        else:
            out[i] = rng.choice(_KEYBOARD)
    return "".join(out)


def oversample(train: list[Example], target: int, rng: random.Random) -> list[Example]:
    """Copies of rows of classes with fewer than `target` rows, up to `target` each."""
    counts = Counter(e.target for e in train)
    by_label: dict[str, list[Example]] = {}
    for e in train:
        by_label.setdefault(e.target, []).append(e)
    out = []
    for label, n in sorted(counts.items()):
        out += [replace(rng.choice(by_label[label]), augmented="oversample", record=None) for _ in range(target - n)]
    return out


@lru_cache(maxsize=50_000)
def synonyms(word: str, k: int = 5) -> tuple[str, ...]:
    """Up to k related whole words from the embedding model's vocabulary (empty when unknown)."""
    table = _word_table()
    if table is None or word not in table[1]:
        return ()
    vectors, index, words = table
    sims = vectors @ vectors[index[word]]
    best = sims.argsort()[::-1][1:k + 1]
    return tuple(words[i] for i in best if sims[i] >= 0.4 and not words[i].startswith(word[:4]))


@lru_cache(maxsize=1)
def _word_table():
    from tunesmith.data.embed import _load
    from tunesmith.errors import ModelError

    try:
        tokenizer, model = _load()
    except ModelError:
        return None
    vocab = tokenizer.get_vocab()
    words = [w for w in vocab if w.isalpha() and w.islower() and len(w) > 2]
    weights = model.get_input_embeddings().weight.detach()
    vectors = weights[[vocab[w] for w in words]]
    vectors = (vectors / vectors.norm(dim=1, keepdim=True)).numpy()
    return vectors, {w: i for i, w in enumerate(words)}, words
