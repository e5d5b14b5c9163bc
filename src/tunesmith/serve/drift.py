"""Drift of live inputs and outputs against the training reference.

Signals (each a score, a threshold from `serve.drift`, and a flag):
- `embedding`: PSI of the share of texts nearest to each of k clusters of training embeddings
  (all-MiniLM-L6-v2), i.e. has the topic mix moved;
- `length`: PSI of text length over the training length deciles;
- `unknown_tokens`: rise in the share of tokens never seen in training texts;
- `labels` (classification): PSI of predicted labels against the fine-tuned model's test predictions;
- `confidence` (classification): drop of the mean top-label probability against the test split.
PSI (population stability index) = sum over bins of (live - ref) * ln(live / ref). On small samples
PSI is biased upwards (about (bins - 1) * (1/n_live + 1/n_ref) with no drift at all), so a PSI
signal counts as drift only when it is over its threshold *and* a chi-square test of the two
samples' bin counts rejects "same distribution" at `serve.drift.p_value`.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

from tunesmith import fsio
from tunesmith.evaluate.predictions_file import read_test_predictions
from tunesmith.models.tokens import text_ids

EPS = 1e-4


def psi(reference: np.ndarray | list[float], live: np.ndarray | list[float]) -> float:
    """Population stability index of two distributions over the same bins (smoothed by EPS)."""
    ref = np.asarray(reference, dtype=float) + EPS
    cur = np.asarray(live, dtype=float) + EPS
    ref, cur = ref / ref.sum(), cur / cur.sum()
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def same_distribution_p(ref_shares: list[float], n_ref: int, live_shares: list[float], n_live: int) -> float:
    """p-value of the chi-square test that two samples' bin counts come from one distribution."""
    from scipy.stats import chi2_contingency

    table = np.array([np.asarray(ref_shares) * n_ref, np.asarray(live_shares) * n_live])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(chi2_contingency(table, correction=False)[1])


def shares(indices: np.ndarray, n_bins: int) -> list[float]:
    counts = np.bincount(np.asarray(indices, dtype=int), minlength=n_bins)[:n_bins]
    return (counts / max(counts.sum(), 1)).tolist()


def build_reference(run_dir: Path, clusters: int = 8, seed: int = 0) -> dict:
    """Training-side statistics of a run directory (written to monitor/reference.json by `reference`)."""
    from sklearn.cluster import KMeans

    from tunesmith.data.embed import embed

    run_dir = Path(run_dir)
    train = [r for r in fsio.read_jsonl(run_dir / "data" / "train.jsonl", missing_ok=True) if not r.get("augmented")]
    texts = [r["input"] for r in train]
    held = [r["input"] for r in fsio.read_jsonl(run_dir / "data" / "test.jsonl", missing_ok=True)]
    edges = np.unique(np.quantile([len(t) for t in texts], np.linspace(0, 1, 11)[1:-1])).tolist()
    vectors = embed(texts)
    k = max(2, min(clusters, len(texts) // 5))
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(vectors)
    seen = _token_set(run_dir, texts)
    ref = {"texts": len(texts), "length_edges": edges,
           "length_shares": shares(np.searchsorted(edges, [len(t) for t in texts], side="right"), len(edges) + 1),
           "centroids": km.cluster_centers_.round(6).tolist(), "cluster_shares": shares(km.labels_, k),
           "unknown_rate": _unknown_rate(run_dir, held, seen), "seen_tokens": sorted(seen)}
    preds = read_test_predictions(run_dir) or []
    if preds and "confidence" in preds[0]:
        counts = Counter(r["prediction"] for r in preds)
        ref["label_shares"] = {lab: counts[lab] / len(preds) for lab in sorted(counts)}
        ref["predictions"] = len(preds)
        known = [r["confidence"] for r in preds if r["confidence"] is not None]  # null: a NaN the model gave
        ref["confidence"] = float(np.mean(known)) if known else None
    return ref


def reference(run_dir: Path, clusters: int = 8) -> dict:
    """The run's drift reference, built once and kept in monitor/reference.json."""
    path = Path(run_dir) / "monitor" / "reference.json"
    if path.is_file():
        return fsio.read_json(path)
    ref = build_reference(run_dir, clusters)
    fsio.write_json(path, ref)
    return ref


def drift_report(ref: dict, rows: list[dict], settings, run_dir: Path | None = None) -> dict:
    """Each signal's score and flag for live request rows ({input, label, confidence}), plus a recommendation."""
    from tunesmith.data.embed import embed

    texts = [r["input"] for r in rows if r.get("input")]
    report = {"requests": len(texts), "signals": {}}
    if len(texts) < settings.min_requests:
        report.update(drift=False, recommendation="wait",
                      reason=f"{len(texts)} live requests; need at least {settings.min_requests} for a verdict")
        return report
    signals = report["signals"]
    centroids = np.asarray(ref["centroids"])
    nearest = np.argmax(embed(texts) @ centroids.T, axis=1)
    n_ref, n = ref["texts"], len(texts)
    signals["embedding"] = _psi_signal(ref["cluster_shares"], n_ref, shares(nearest, len(centroids)), n,
                                       settings.psi_threshold, settings.p_value)
    lengths = np.searchsorted(ref["length_edges"], [len(t) for t in texts], side="right")
    signals["length"] = _psi_signal(ref["length_shares"], n_ref, shares(lengths, len(ref["length_edges"]) + 1), n,
                                    settings.length_psi_threshold, settings.p_value)
    if run_dir is not None:
        rate = _unknown_rate(run_dir, texts, set(ref["seen_tokens"]))
        signals["unknown_tokens"] = _signal(rate - ref["unknown_rate"], settings.unknown_rate_threshold,
                                            live=rate, reference=ref["unknown_rate"])
    if "label_shares" in ref:
        labels = [r["label"] for r in rows if r.get("label")]
        names = sorted(set(ref["label_shares"]) | set(labels))
        live = Counter(labels)
        signals["labels"] = _psi_signal([ref["label_shares"].get(k, 0) for k in names], ref["predictions"],
                                        [live[k] / max(len(labels), 1) for k in names], len(labels),
                                        settings.psi_threshold, settings.p_value)
        conf = [r["confidence"] for r in rows if r.get("confidence") is not None]
        if conf and ref["confidence"] is not None:
            signals["confidence"] = _signal(ref["confidence"] - float(np.mean(conf)),
                                            settings.confidence_drop_threshold, live=float(np.mean(conf)),
                                            reference=ref["confidence"])
    report.update(_recommend(signals))
    return report


def _psi_signal(ref_shares: list[float], n_ref: int, live_shares: list[float], n_live: int, threshold: float,
                alpha: float) -> dict:
    score = psi(ref_shares, live_shares)
    p = same_distribution_p(ref_shares, n_ref, live_shares, n_live)
    return {"score": round(score, 4), "threshold": threshold, "p_value": float(f"{p:.4g}"),
            "drift": bool(score > threshold and p < alpha)}


def _signal(score: float, threshold: float, **extra) -> dict:
    return {"score": round(score, 4), "threshold": threshold, "drift": bool(score > threshold),
            **{k: round(v, 4) for k, v in extra.items()}}


def _recommend(signals: dict) -> dict:
    flagged = [n for n, s in signals.items() if s["drift"]]
    inputs = [n for n in flagged if n in ("embedding", "length", "unknown_tokens")]
    outputs = [n for n in flagged if n in ("labels", "confidence")]
    detail = ", ".join(f"{n} {signals[n]['score']} > {signals[n]['threshold']}" for n in flagged)
    if inputs and outputs:
        return {"drift": True, "recommendation": "retrain",
                "reason": "live inputs differ from the training data "
                          f"and the model's answers moved with them ({detail}); "
                          "label a sample of recent requests and retrain on it"}
    if flagged:
        return {"drift": True, "recommendation": "investigate",
                "reason": f"drift in {detail}; label a sample of recent requests and check the model's accuracy on it "
                          "before retraining"}
    return {"drift": False, "recommendation": "no action", "reason": "every signal is under its threshold"}


def _token_set(run_dir: Path, texts: list[str]) -> set[int]:
    tok = _tokenizer(str(run_dir))
    return {i for t in texts for i in text_ids(tok, t)}


def _unknown_rate(run_dir: Path, texts: list[str], seen: set[int]) -> float:
    tok = _tokenizer(str(run_dir))
    ids = [i for t in texts for i in text_ids(tok, t)]
    return sum(i not in seen for i in ids) / max(len(ids), 1)


@lru_cache(maxsize=4)
def _tokenizer(run_dir: str):
    from tunesmith.models.load import load_tokenizer

    return load_tokenizer(Path(run_dir) / "model")
