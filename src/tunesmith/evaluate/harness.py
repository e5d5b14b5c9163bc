"""An adapter to lm-evaluation-harness (`pip install lm-eval`): its tasks, run on the baseline and
the fine-tuned model inside the eval stage, next to tunesmith's own suites.

Built-in harness tasks fetch their datasets from the Hugging Face hub; on a machine without it,
point `eval.harness.include_path` at a folder of task YAMLs over local files (`dataset_path: json`,
`dataset_kwargs.data_files`). Adapters are merged into a copy of the weights first: the harness
calls the model as a plain causal LM. Soft-prompt runs keep their trained part outside the weights,
so the harness sees their base model; their task figures are skipped with that reason.
"""

from __future__ import annotations

import os

from tunesmith.config import HarnessConfig


def run_harness(model, tokenizer, cfg: HarnessConfig, device: str) -> dict:
    """{task: {metric: value}} of lm-evaluation-harness's tasks on `model` (a plain causal LM)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing from a hub at run time
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=device)
    manager = TaskManager(include_path=str(cfg.include_path) if cfg.include_path else None)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=manager, limit=cfg.limit,
                                  num_fewshot=cfg.num_fewshot, apply_chat_template=cfg.apply_chat_template,
                                  log_samples=False, bootstrap_iters=0)
    return {task: _figures(values) for task, values in out["results"].items()}


def _figures(values: dict) -> dict:
    """{"acc": 0.7, ...} from the harness's {"acc,none": 0.7, "acc_stderr,none": ..., "alias": ...}."""
    figures = {}
    for key, value in values.items():
        name, _, flt = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in name \
                and name != "sample_len":
            figures[name if flt in ("", "none") else f"{name},{flt}"] = round(float(value), 6)
    return figures


def harness_report(base: dict, tuned: dict | None, skipped: str | None = None) -> dict:
    """Per task and metric: baseline, fine-tuned and the difference."""
    report = {"tasks": {}}
    for task, figures in base.items():
        report["tasks"][task] = {m: {"baseline": v, "finetuned": (tuned or {}).get(task, {}).get(m),
                                     "diff": None if tuned is None or tuned.get(task, {}).get(m) is None
                                     else round(tuned[task][m] - v, 6)} for m, v in figures.items()}
    if skipped:
        report["skipped"] = skipped
    return report
