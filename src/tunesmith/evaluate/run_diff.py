"""Two runs side by side: what their configs change, and how their metrics differ, with a paired
test when both predicted the same test examples."""

from __future__ import annotations

from pathlib import Path

import yaml

from tunesmith import fsio
from tunesmith.config import yaml_text
from tunesmith.evaluate.compare import compare
from tunesmith.evaluate.predictions_file import PREDICTIONS, example_key, read_test_predictions
from tunesmith.registry import metric_names
from tunesmith.runs import read_summary


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{"train.lora.r": 8, ...} from a nested dict."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(a: Path, b: Path) -> list[dict]:
    """Keys whose resolved values differ between the runs' config.yaml files."""
    ca, cb = flatten(_config(Path(a) / "config.yaml")), flatten(_config(Path(b) / "config.yaml"))
    return [{"key": k, "a": ca.get(k), "b": cb.get(k)} for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]


def _task_type(run: Path) -> object:
    task = _config(Path(run) / "config.yaml").get("task")
    return task.get("type") if isinstance(task, dict) else None


def _config(path: Path) -> dict:
    """A run's config.yaml as a dict; fsio.DamagedFile (one error line naming it) when it is not YAML
    tunesmith wrote: unparsable, refused (an alias bomb), or not a mapping."""
    try:
        data = yaml_text.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        raise fsio.DamagedFile(path, str(getattr(e, "problem", None) or e), mark.line + 1 if mark else None,
                               what="not valid YAML") from None
    if not isinstance(data, dict):
        raise fsio.DamagedFile(path, f"a {type(data).__name__}, not a mapping of config keys", what="not a config")
    return data


def metric_diff(a: Path, b: Path, resamples: int = 1000, seed: int = 0) -> dict:
    """Fine-tuned metrics of both runs, B - A, and a paired comparison when the test examples match
    (`unpaired` says why there is none)."""
    sa, sb = read_summary(a), read_summary(b)
    ma, mb = sa["metrics"]["finetuned"], sb["metrics"]["finetuned"]
    rows = {k: {"a": ma[k], "b": mb[k], "diff": round(mb[k] - ma[k], 6)}
            for k in sorted(set(ma) & set(mb)) if isinstance(ma[k], (int, float)) and isinstance(mb[k], (int, float))}
    pa, pb = read_test_predictions(a), read_test_predictions(b)
    paired, unpaired = None, _unpaired(a, b, pa, pb)
    same = unpaired is None and [example_key(r) for r in pa] == [example_key(r) for r in pb]
    shared = 0
    if unpaired is None:
        # The examples both runs scored (all of them for runs of one test split; the common ones of two
        # overlapping splits, matched by prompt and gold answer as `human export --against` matches them).
        if same:
            both = list(zip(pa, pb))
        else:  # a test row given twice pairs once with each of the other run's copies, not all with one
            by_key: dict = {}
            for r in pb:
                by_key.setdefault(example_key(r), []).append(r)
            both = [(r, by_key[k].pop(0)) for r in pa if by_key.get(k := example_key(r))]
        shared = len(both)
        task = "classification" if "correct" in pa[0] else "generation"
        paired = compare(task, [x["gold"] for x, _ in both], [x["prediction"] for x, _ in both],
                         [y["prediction"] for _, y in both], [sa["objective_metric"]], resamples, seed)
    return {"metric": sa["objective_metric"], "metrics": rows, "paired": paired, "paired_examples": shared,
            "same_test_examples": same, "unpaired": unpaired}


def _unpaired(a: Path, b: Path, pa: list[dict] | None, pb: list[dict] | None) -> str | None:
    """Why the two runs' test predictions cannot be paired, or None when they can."""
    for run, rows in ((a, pa), (b, pb)):
        if rows is None:
            return f"{Path(run) / PREDICTIONS} is missing"
    if not pa or not pb or "prediction" not in pa[0] or "prediction" not in pb[0]:
        return "a text run makes no predictions to pair (it is scored by perplexity)"
    types = [_task_type(run) for run in (a, b)]
    # A label scored right or wrong is no exact match of a generated answer; generation and chat runs
    # share their metrics (and rows), and pair.
    if metric_names(str(types[0])) != metric_names(str(types[1])):
        return f"the runs are of different task types ({types[0]}, {types[1]})"
    if not {example_key(r) for r in pa} & {example_key(r) for r in pb}:
        return "the runs share no test example (the same prompt and gold answer)"
    return None
