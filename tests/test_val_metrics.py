"""Every validation of a classification run logs accuracy and macro precision, recall and F1 (issue 22)."""

from __future__ import annotations

import json

from conftest import make_texts
from tunesmith.config import TaskConfig, TrainConfig
from tunesmith.data.examples import Example
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.tasks.metrics import compute_metrics, per_class
from tunesmith.tasks.prompts import build_format
from tunesmith.train import trainer

FOUR = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def _data(n: int, seed: int) -> list[Example]:
    return [Example(r["text"], r["label"], "t") for r in make_texts(n, seed)]


def test_each_validation_record_holds_the_four_figures_of_its_predictions(tiny_model, tmp_path, monkeypatch):
    seen = []  # the validation predictions, in order, as the trainer's own predict call returned them

    def recording_predict(*args, **kwargs):
        out = real_predict(*args, **kwargs)
        seen.append(list(out.texts))
        return out

    real_predict = trainer.predict
    monkeypatch.setattr(trainer, "predict", recording_predict)
    tok, model = load_tokenizer(tiny_model), load_model(tiny_model)
    fmt = build_format(TaskConfig(instruction="Classify."), ["alpha", "beta", "gamma"], tok)
    cfg = TrainConfig(max_steps=4, eval_every=2, batch_size=4, learning_rate=0.01)
    val = _data(6, 2)
    # The objective is none of the four: its key stays in the record beside them.
    trainer.fit(model, tok, fmt, _data(24, 1), val, cfg, "f1_micro", out_dir=tmp_path, progress=False)

    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and len(seen) == 2
    golds = [e.target for e in val]
    for record, preds in zip(evals, seen):
        assert set(FOUR) | {"f1_micro"} <= set(record)
        expected = compute_metrics("classification", golds, preds)
        assert {k: record[k] for k in (*FOUR, "f1_micro")} == {k: expected[k] for k in (*FOUR, "f1_micro")}
        table = per_class(golds, preds, sorted(set(golds)))  # macro = the mean over the gold labels
        for key, column in (("precision_macro", "precision"), ("recall_macro", "recall"), ("f1_macro", "f1")):
            assert abs(record[key] - sum(row[column] for row in table.values()) / len(table)) < 1e-6
        assert record["accuracy"] == round(sum(g == p for g, p in zip(golds, preds)) / len(golds), 6)
