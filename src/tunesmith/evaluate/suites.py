"""Extra evaluation suites (`benchmarks:` in the config), scored for baseline and fine-tuned.

Each suite is a data file with its own task section (fields, instruction, labels); both models
answer it with the same prompt, and it gets the same metrics and paired comparison as the test
split. A suite unrelated to the fine-tuning task shows what the fine-tuning cost elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.config import SuiteConfig
from tunesmith.data.examples import Example, load_examples, raise_for_problems
from tunesmith.evaluate.compare import compare
from tunesmith.tasks.metrics import compute_metrics, metric_names
from tunesmith.tasks.predict import Predictions, predict
from tunesmith.tasks.prompts import PromptFormat, build_format


@dataclass
class Suite:
    cfg: SuiteConfig
    examples: list[Example]
    fmt: PromptFormat


def load_suites(configs: list[SuiteConfig], tokenizer) -> list[Suite]:
    """Read and validate every suite's data (a bad row is an error naming file:line)."""
    suites = []
    for cfg in configs:
        examples, problems = load_examples(cfg.data, cfg.task)
        raise_for_problems(problems, 20)
        examples = examples[: cfg.max_examples] if cfg.max_examples else examples
        labels = cfg.task.labels or (sorted({e.target for e in examples}) if cfg.task.type == "classification"
                                     else None)
        suites.append(Suite(cfg, examples, build_format(cfg.task, labels, tokenizer)))
    return suites


def predict_suites(model, tokenizer, suites: list[Suite], batch_size: int, max_new_tokens: int, bf16: bool,
                   name: str, progress: bool) -> list[Predictions]:
    return [predict(model, tokenizer, s.fmt, s.examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    autocast=bf16, progress=f"{s.cfg.name} {name}" if progress else None) for s in suites]


def suite_report(suites: list[Suite], base: list[Predictions], tuned: list[Predictions], resamples: int,
                 seed: int) -> dict:
    """{suite name: {examples, metric, baseline, finetuned, comparison}}."""
    out = {}
    for suite, b, t in zip(suites, base, tuned):
        task = suite.cfg.task.type
        golds = [e.target for e in suite.examples]
        names = metric_names(task)
        out[suite.cfg.name] = {
            "examples": len(golds), "metric": suite.cfg.metric or names[0], "data": str(suite.cfg.data),
            "baseline": compute_metrics(task, golds, b.texts), "finetuned": compute_metrics(task, golds, t.texts),
            "comparison": compare(task, golds, b.texts, t.texts, [suite.cfg.metric or names[0]], resamples, seed)}
    return out
