"""What the variants are built from: the run's fine-tuned model, its prompt format and splits."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith import fsio
from tunesmith.config import Project
from tunesmith.data.prepare import Splits
from tunesmith.models.load import plain_lm
from tunesmith.optimize.variants import NotApplicable
from tunesmith.tasks.prompts import PromptFormat


@dataclass
class Source:
    """The fine-tuned model as trained (`model`: PEFT-wrapped for adapters) and how to get plain weights."""

    run_dir: Path
    project: Project
    splits: Splits
    model: object
    tokenizer: object
    fmt: PromptFormat
    kind: str
    progress: bool = True
    _plain: object = field(default=None, repr=False)

    def bar(self, label: str) -> str | None:
        """A progress-bar label, or None when progress output is off."""
        return label if self.progress else None

    @property
    def is_mergeable_adapter(self) -> bool:
        config = getattr(self.model, "peft_config", {}).get("default")
        return self.kind == "adapter" and config is not None and not config.is_prompt_learning

    def plain(self):
        """A plain transformers model computing what the fine-tuned model computes (adapter merged).

        Raises:
            NotApplicable: for soft-prompt and prefix runs, whose trained part is not in the weights.
        """
        if self._plain is None:
            # Full weights and prompt optimisation (base weights, chosen prompt in fmt) come back as is.
            self._plain = plain_lm(self.model)
            if self._plain is None:
                method = fsio.read_json(self.run_dir / "model/tunesmith.json")["method"]
                raise NotApplicable(f"a {method} run keeps its trained virtual tokens outside the weights; train "
                                    "with a method that changes weights")
        return self._plain

    def plain_copy(self):
        """A private copy of the plain model, for variants that change weights."""
        return copy.deepcopy(self.plain())


def open_source(run_dir: Path, project: Project, splits: Splits, progress: bool = True) -> Source:
    from tunesmith.train.finetuned import load_finetuned, read_meta

    model, tokenizer, fmt, _ = load_finetuned(Path(run_dir) / "model", need_base=False)
    kind = read_meta(Path(run_dir) / "model")["kind"]
    return Source(Path(run_dir), project, splits, model, tokenizer, fmt, kind, progress)
