"""The eval stage for task.type text (continued pre-training): held-out loss of both models.

Each test document is chunked as in training (tasks/text.py) and every token after its first is
scored. A document's figures are its count of predicted tokens and the summed negative
log-likelihood (nats) the model gives them; `perplexity` and `token_loss` (tasks/metrics.py) pool
those over documents, and `compare.compare` resamples documents for the paired interval, as it
does examples for the other metrics. No generation, latency or judge: nothing is generated.
"""

from __future__ import annotations

import torch

from tunesmith import fsio, hardware
from tunesmith.config import Project
from tunesmith.data.examples import Example
from tunesmith.data.prepare import Splits
from tunesmith.evaluate.compare import compare
from tunesmith.evaluate.forgetting import forgetting_report, probe_accuracy
from tunesmith.evaluate.predictions_file import PREDICTIONS
from tunesmith.evaluate.stage import EvalResult
from tunesmith.models.load import load_model
from tunesmith.tasks.metrics import compute_metrics, metric_names
from tunesmith.tasks.text import text_chunks
from tunesmith.train.batching import Encoded, collate
from tunesmith.train.finetuned import load_finetuned
from tunesmith.train.loss import token_losses


@torch.inference_mode()
def document_losses(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 8,
                    bf16: bool = False) -> tuple[list[int], list[float]]:
    """(predicted tokens, summed NLL in nats) of each document, chunked as training chunks it."""
    chunks = [(d, Encoded(c, 0)) for d, text in enumerate(texts) for c in text_chunks(tokenizer, text, max_length)]
    tokens, nll = [0] * len(texts), [0.0] * len(texts)
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(chunks), batch_size):
            part = chunks[start:start + batch_size]
            batch = {k: v.to(dev) for k, v in collate([e for _, e in part], tokenizer.pad_token_id).items()}
            with hardware.autocast(bf16, dev):
                ce = token_losses(model, batch).double().cpu()  # (N,) row after row
            for (doc, enc), row in zip(part, ce.split([len(e.ids) - 1 for _, e in part])):
                tokens[doc] += len(row)
                nll[doc] += float(row.sum())
    finally:
        model.train(was_training)
    return tokens, nll


def text_eval_stage(project: Project, splits: Splits, run_dir, progress: bool = True) -> EvalResult:
    """Write metrics.json and predictions/test.jsonl for a text task; return the figures."""
    test = splits.test[: project.eval.max_examples] if project.eval.max_examples else splits.test
    texts = [e.input for e in test]
    model, tokenizer, fmt, base_path = load_finetuned(run_dir / "model")
    bf16 = hardware.use_bf16(project.eval.precision, hardware.device())
    tuned = _measure(project, model.to(hardware.device()), tokenizer, texts, bf16)
    del model
    base = _measure(project, load_model(base_path).to(hardware.device()), tokenizer, texts, bf16)
    tokens = tuned["tokens"]
    result = EvalResult(base["figures"], tuned["figures"], len(test), {})
    result.comparison = compare(fmt.task_type, tokens, base["nll"], tuned["nll"], metric_names(fmt.task_type),
                                project.eval.bootstrap_resamples, project.eval.seed)
    if project.eval.forgetting_probe:
        result.forgetting = forgetting_report(base["probe"], tuned["probe"])
    train = run_dir / "train.json"
    if train.is_file():
        result.train = fsio.read_json(train)["stats"]
    fsio.write_json(run_dir / "metrics.json", result.to_json())
    fsio.write_jsonl(run_dir / PREDICTIONS, _rows(test, tokens, base["nll"], tuned["nll"]))
    return result


def _measure(project: Project, model, tokenizer, texts: list[str], bf16: bool) -> dict:
    """One model's per-document losses, pooled figures and (when configured) forgetting-probe accuracy."""
    tokens, nll = document_losses(model, tokenizer, texts, project.task.max_length, project.eval.batch_size, bf16)
    figures = compute_metrics("text", tokens, nll)
    figures["test_tokens"] = sum(tokens)
    probe = probe_accuracy(model, tokenizer, project.task.max_length, bf16) if project.eval.forgetting_probe else None
    return {"tokens": tokens, "nll": nll, "figures": figures, "probe": probe}


def _rows(test: list[Example], tokens: list[int], base: list[float], tuned: list[float]) -> list[dict]:
    """predictions/test.jsonl: each document's mean NLL per token under both models."""
    return [{"text": ex.input, "source": ex.source, "tokens": n,
             "nll_per_token": round(t / max(n, 1), 6), "baseline_nll_per_token": round(b / max(n, 1), 6)}
            for ex, n, b, t in zip(test, tokens, base, tuned)]
