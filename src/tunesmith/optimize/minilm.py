"""A small sentence classifier: all-MiniLM-L6-v2 (22M parameters, 6 layers) with mean pooling and a
linear head over the labels. It reads the bare input text (no instruction, no chat template), which
with its size is what makes it many times faster than the causal LM it learns from."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tunesmith import fsio
from tunesmith.data.embed import model_path
from tunesmith.data.examples import Example
from tunesmith.models.tokens import literal_batch
from tunesmith.optimize.predictor import VARIANT_FILE, Predictor
from tunesmith.tasks.predict import Predictions
from tunesmith.tasks.prompts import PromptFormat
from tunesmith.train.loss import distillation_loss
from tunesmith.train.trainer import train_step

MAX_TOKENS = 128


class MiniLMClassifier(torch.nn.Module):
    def __init__(self, encoder, n_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, n_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)                                        # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)                                  # (B, H)
        return self.head(pooled)                                                                    # (B, L)


def new_classifier(n_labels: int, seed: int = 0):
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    path = model_path()
    encoder = AutoModel.from_pretrained(str(path), use_safetensors=True)
    return MiniLMClassifier(encoder, n_labels), AutoTokenizer.from_pretrained(str(path))


def train_classifier(model, tokenizer, texts: list[str], targets: list[int], teacher_logits: torch.Tensor,
                     epochs: int, learning_rate: float, temperature: float, alpha: float, batch_size: int = 16,
                     seed: int = 0, progress: str | None = None) -> list[float]:
    """Fit the classifier to the teacher's label distribution (N, L) and the gold labels.

    Each step is the trainer's (train.trainer.train_step) with a distillation loss on the pooled
    logits, in fp32, without gradient clipping or a schedule (AdamW at a constant rate)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    params = list(model.parameters())
    dev = next(model.parameters()).device

    def loss(m, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = m(batch["input_ids"], batch["attention_mask"])  # (B, L)
        return distillation_loss(logits, batch["teacher"], batch["gold"], temperature, alpha)

    batches = _batches(tokenizer, texts, torch.tensor(targets), teacher_logits, epochs, batch_size, seed)
    steps = epochs * ((len(texts) + batch_size - 1) // batch_size)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=progress, unit="step", disable=progress is None, dynamic_ncols=True):
        losses.append(train_step(model, batches, optimizer, params=params, dev=dev, loss_fn=loss).loss)
    model.eval()
    return losses


def _batches(tokenizer, texts: list[str], gold: torch.Tensor, teacher_logits: torch.Tensor, epochs: int,
             batch_size: int, seed: int):
    """Tokenized batches with their teacher logits (B, L) and gold labels (B,), reshuffled every epoch."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = literal_batch(tokenizer, [texts[i] for i in idx], padding=True, truncation=True,
                                max_length=MAX_TOKENS, return_tensors="pt")
            yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                   "teacher": teacher_logits[idx], "gold": gold[idx]}


@torch.inference_mode()
def classify(model, tokenizer, labels: list[str], examples: list[Example], batch_size: int) -> Predictions:
    texts, probs = [], []
    for start in range(0, len(examples), batch_size):
        # User text: a typed [SEP] or [MASK] stays text (models/tokens.py).
        enc = literal_batch(tokenizer, [e.input for e in examples[start:start + batch_size]], padding=True,
                            truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        p = torch.softmax(model(enc["input_ids"], enc["attention_mask"]).float(), dim=-1)  # (B, L)
        for row in p.tolist():
            texts.append(labels[max(range(len(row)), key=row.__getitem__)])
            probs.append(dict(zip(labels, row)))
    return Predictions(texts, probs)


def save_classifier(model, tokenizer, labels: list[str], out_dir: Path, **meta) -> None:
    from safetensors.torch import save_file

    model.encoder.save_pretrained(str(out_dir / "encoder"), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir / "encoder"))
    save_file({"weight": model.head.weight.detach().contiguous(), "bias": model.head.bias.detach().contiguous()},
              str(out_dir / "head.safetensors"))
    fsio.write_json(out_dir / VARIANT_FILE, {"engine": "minilm", "labels": labels, **meta})


def load_classifier(path: Path) -> Predictor:
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    labels = fsio.read_json(Path(path) / VARIANT_FILE)["labels"]
    encoder = AutoModel.from_pretrained(str(Path(path) / "encoder"), use_safetensors=True)
    model = MiniLMClassifier(encoder, len(labels))
    model.head.load_state_dict(load_file(str(Path(path) / "head.safetensors")))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(Path(path) / "encoder"))
    fmt = PromptFormat(task_type="classification", instruction="", labels=labels, list_labels=False,
                       max_length=MAX_TOKENS)
    return Predictor(lambda examples, batch_size: classify(model, tokenizer, labels, examples, batch_size), model, fmt)
