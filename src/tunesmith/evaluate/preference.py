"""Held-out preference pairs in the eval stage: both models' per-pair margins and their paired comparison.

A test row with a rejected answer is a pair. Its margin under a model is log p(chosen) - log p(rejected),
summed over the answer tokens with the model's own prompt format (train/preference_fit.pair_margins):
the same definition for the base and the tuned model, so the comparison is paired per pair.
`preference_accuracy` (share of pairs with a positive margin) is a mean of per-pair right/wrong and takes
McNemar's test; `reward_margin` (mean margin, nats) takes the paired bootstrap (evaluate/compare.py).
"""

from __future__ import annotations

from tunesmith.config import Project
from tunesmith.data.examples import Example
from tunesmith.data.pairs import Pair, pairs_from_examples
from tunesmith.errors import InputError, RunDirError
from tunesmith.evaluate.compare import compare
from tunesmith.registry import METHOD_SPECS, PREFERENCE_METRICS
from tunesmith.tasks.metrics import compute_metrics
from tunesmith.train.preference_fit import pair_margins


def held_out_pairs(project: Project, test: list[Example]) -> list[Pair]:
    """The test rows that are pairs. Raises InputError when the objective is a pair metric and there are none."""
    pairs = pairs_from_examples([e for e in test if e.rejected is not None])
    if not pairs and project.objective.metric in PREFERENCE_METRICS:
        raise InputError(f"objective.metric {project.objective.metric} needs test rows with a rejected answer; "
                         "the test split has none", "objective.metric",
                         "give {prompt, chosen, rejected} test rows, or judge a generation metric")
    return pairs


def reference_rows(project: Project, test: list[Example]) -> tuple[list[Example], dict[str, int] | None]:
    """(the test rows whose target is a reference answer for generation metrics, the others counted by
    reason; None for a method that is not preference tuning). A KTO row labelled undesirable is not one
    (its completion is what the model should not say) and is no pair either: it is left out of every
    figure, and the count says so (metrics.json, summary.json, the CLI), as test_rows_removed does for
    rows the data stage removed."""
    if not METHOD_SPECS[project.train.method].preference:
        return test, None
    kept = [e for e in test if e.desirable is not False]
    return kept, ({"kto_undesirable": len(test) - len(kept)} if len(kept) < len(test) else {})


def scored_test(project: Project, test: list[Example], rows: list[dict], run_dir) -> list[Example]:
    """The test examples the eval stage scored (eval.max_examples, reference rows), in the order of
    predictions/test.jsonl's `rows`; RunDirError when the file does not hold them (edited, truncated, or
    left from another split): a variant or an export measured against it would be compared row by row
    with answers to other questions."""
    test = test[: project.eval.max_examples] if project.eval.max_examples else test
    test, _ = reference_rows(project, test)
    if not test or len(test) != len(rows) or any(ex.input != r["text"] for ex, r in zip(test, rows)):
        raise RunDirError("predictions/test.jsonl does not match the run's test split", str(run_dir),
                          "re-run `tunesmith eval RUN_DIR`")
    return test


def pair_figures(model, tokenizer, fmt, pairs: list[Pair], batch_size: int) -> tuple[list[float], dict]:
    """(per-pair margins, {preference_accuracy, reward_margin}) of one model."""
    margins = pair_margins(model, tokenizer, fmt, pairs, batch_size)
    return margins, compute_metrics("preference", [""] * len(margins), margins)


def pair_comparison(base: list[float], tuned: list[float], resamples: int, seed: int) -> dict:
    """The paired statistics of the pair metrics, tuned minus base on the same pairs."""
    return compare("preference", [""] * len(base), base, tuned, list(PREFERENCE_METRICS), resamples, seed)
