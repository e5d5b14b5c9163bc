"""The pydantic models of project.yaml: one class per section, unknown keys refused, cross-field
rules as validators. The sections of the stages after training are in config/stages.py, the
self-contained settings groups nested in them in config/settings.py; loading, locating errors in the
file and deriving configs are in config/load.py."""

from __future__ import annotations

import json
import math
import unicodedata
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from tunesmith.config.settings import (
    DecontaminateSettings,
    LabelNoiseSettings,
    LoraConfig,
    MonitorSettings,
    NearDedupSettings,
    NormalizeSettings,
    OverfitSettings,
    PiiSettings,
    PreferenceSettings,
    PrefixTuningSettings,
    PromptSearchSettings,
    PromptTuningSettings,
    RetrainSettings,
    SemanticDedupSettings,
    _Strict,
    label_form,
)
from tunesmith.config.sources import (
    COLUMN_FIELDS,
    DataSource,
    as_sources,
    check_columns,
)
from tunesmith.config.sources import KeyedError as _KeyedError
from tunesmith.config.stages import (
    EvalConfig,
    ExportConfig,
    FairnessConfig,
    OptimizeConfig,
    ServeConfig,
)
from tunesmith.registry import (
    CHAT_TEMPLATES,
    CONSTRAINT_FIGURES,
    FAIRNESS_FIGURES,
    METHOD_SPECS,
    METHODS,
    METRIC_SPECS,
    metric_names,
)

_C = TypeVar("_C", bound="_Strict")


# Task keys that mean nothing for raw documents (task.type text); set explicitly, they are refused.
MAX_LABEL_CHARS = 200
# Characters that make two labels look alike or one look like another (ZWNJ and ZWJ stay: words use them).
_INVISIBLE = frozenset("\u00ad\u200b\u2060\ufeff\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                       "\u2066\u2067\u2068\u2069")
TEXT_UNUSED_TASK_KEYS = ("label_field", "prompt_field", "completion_field", "instruction", "labels", "list_labels",
                         "label_scoring", "train_on", "chat_template")


def label_problem(label: str) -> str | None:
    """Why a label cannot be one (a label is a short name the model writes, and feedback names it again;
    `control_problem`), or None. task.labels, the labels read from data, corrections and feedback all ask."""
    if len(label) > MAX_LABEL_CHARS:
        return f"is {len(label):,} characters long, over {MAX_LABEL_CHARS} (a label is a short name the model writes)"
    return control_problem(label)


def control_problem(text: str) -> str | None:
    """Why a name shown in prompts, reports and on a terminal cannot be one (a line break would split
    prompts, reports and feedback; an invisible character makes two names look alike), or None."""
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in _INVISIBLE for c in text):
        return "holds a control or invisible character (a line break, a zero-width space, a direction mark)"
    return None


# Train keys the preference loop does not implement; set (non-default) with a preference method, they are refused.
PREFERENCE_UNUSED_TRAIN_KEYS = ("batch_tokens", "label_smoothing", "checkpoint_every", "keep_checkpoints")


def unread_preference_setting(train: TrainConfig) -> tuple[tuple, str] | None:
    """(key, message) for train.beta or a train.preference.* key set (to other than its default) under a
    supervised method, which would ignore it: the config most likely meant a preference method. Checked
    on a project file as written (config/load.py), not in validation: a derived config (compare switching
    a DPO config to lora) and a run's saved config.yaml from before this check may hold such values."""
    if METHOD_SPECS[train.method].preference:
        return None
    keys = [(("train", "beta"), train.beta != TrainConfig.model_fields["beta"].get_default())]
    keys += [(("train", "preference", k), getattr(train.preference, k) != f.get_default())
             for k, f in PreferenceSettings.model_fields.items()]
    key = next((k for k, changed in keys if changed), None)
    if key is None:
        return None
    preference = ", ".join(m for m in METHODS if METHOD_SPECS[m].preference)
    return key, (f"{'.'.join(key)} is read only by the preference methods ({preference}); train.method is "
                 f"{train.method}: remove it or set train.method to one of them")


class TaskConfig(_Strict):
    """What the model should do and where the fields are."""

    # text: continued pre-training on raw documents (text_field), loss on every token, long ones chunked.
    type: Literal["classification", "generation", "chat", "text"] = "classification"
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    instruction: str = ""
    labels: list[str] | None = None
    list_labels: bool | Literal["auto"] = "auto"
    max_length: int = Field(512, ge=16)
    # sequence: a label's score is the log-probability of all its tokens; constrained: the probability
    # that decoding restricted to the label set produces it (many labels of several tokens: far faster);
    # constrained_pruned: the same argmax and winner's probability, label groups that cannot win skipped.
    label_scoring: Literal["sequence", "constrained", "constrained_pruned"] = "sequence"
    # Chat/generation rows with several assistant turns: supervise every assistant turn (TRL's assistant-only
    # loss) or only the last one. Single-turn rows are the same either way.
    train_on: Literal["last_turn", "all_assistant_turns"] = "all_assistant_turns"
    # model: the tokenizer's own (none: a plain prompt); a built-in name (registry.CHAT_TEMPLATES); or a .jinja
    # file (relative to the project file). Saved with the fine-tuned model, so serve and export render the same.
    chat_template: str = "model"

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:  # every row's label would be "not in task.labels"
            raise ValueError("the list is empty: list the labels, or leave task.labels out to take those of the data")
        v = [label_form(label) for label in v]  # as labels read from data are (data/examples.py)
        seen: set[str] = set()
        for label in v:
            if not label.strip():
                raise ValueError("a label is empty: every label must be text the model can write")
            if label != label.strip():  # labels read from the data are stripped: this one would match no row
                raise ValueError(f"the label '{label[:80]}' starts or ends with whitespace")
            if problem := label_problem(label):
                raise ValueError(f"the label {json.dumps(label[:80])} {problem}")
            if label in seen:
                raise ValueError(f"the label '{label[:80]}' is listed twice")
            seen.add(label)
        return v

    @model_validator(mode="after")
    def _input_and_answer_apart(self) -> TaskConfig:
        """The column the model reads and the one it learns to write must differ: one column for both trains
        the model to copy its input (data.columns refuses the same)."""
        pairs = {"classification": ("text_field", "label_field"), "generation": ("prompt_field", "completion_field")}
        if self.type in pairs:
            given, answer = pairs[self.type]
            if getattr(self, given) == getattr(self, answer):
                raise _KeyedError(("task", answer), f"task.{answer} names the same column as task.{given} "
                                  f"('{getattr(self, given)}'): the model would learn to copy its input; name the "
                                  "answer's own column")
        return self

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        if v == "model" or v in CHAT_TEMPLATES or v.endswith(".jinja"):
            return v
        raise ValueError(f"unknown chat template '{v}' (use model, {', '.join(CHAT_TEMPLATES)} or a .jinja file)")


class CleanConfig(_Strict):
    """Cleaning steps of the data stage; every change is logged per row with its reason."""

    enabled: bool = True
    normalize: NormalizeSettings = Field(default_factory=NormalizeSettings)
    min_chars: int = Field(1, ge=1)
    max_chars: int | None = Field(None, ge=1)
    exact_dedup: bool = True
    near_dedup: NearDedupSettings = Field(default_factory=NearDedupSettings)
    semantic_dedup: SemanticDedupSettings = Field(default_factory=SemanticDedupSettings)
    pii: PiiSettings = Field(default_factory=PiiSettings)
    decontaminate: DecontaminateSettings = Field(default_factory=DecontaminateSettings)
    label_noise: LabelNoiseSettings = Field(default_factory=LabelNoiseSettings)


class AugmentConfig(_Strict):
    """Extra training rows; never added to validation or test, always marked as augmented."""

    enabled: bool = False
    # Copies per row are bounded: past a few dozen they add no variety, only memory (and paraphrases are
    # model generations: 1,000,000 of them asked for 106 GB before failing).
    eda: int = Field(0, ge=0, le=32)           # EDA copies per training row (synonym/swap/delete/insert)
    eda_rate: float = Field(0.1, gt=0.0, le=0.5)  # share of a row's words each EDA copy changes
    char_noise: int = Field(0, ge=0, le=32)    # copies with character typos per row
    char_noise_rate: float = Field(0.03, gt=0.0, le=0.3)
    paraphrases: int = Field(0, ge=0, le=16)   # paraphrases per row written by the project's model
    oversample_to: int | None = Field(None, ge=1, le=100_000)  # copy rows of rarer classes up to this many each
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's seeds are 32-bit


class DataConfig(_Strict):
    """Data sources (relative paths resolve from the config file's folder) and splits. Each of train, test
    and validation is a file, a glob, hf://NAME[:CONFIG]/SPLIT, a save_to_disk folder, or a list of them
    (strings or {path, weight, max_rows, columns}); test and validation may instead be a fraction of train."""

    train: Path | list[DataSource]
    test: Path | list[DataSource] | float | None = None
    validation: Path | list[DataSource] | float = 0.1
    # tunesmith's field name for the task (text, label, prompt, ...) -> the sources' column holding it.
    columns: dict[str, str] = Field(default_factory=dict)
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's seeds are 32-bit
    max_errors: int = Field(20, ge=1)
    group_field: str | None = None             # rows sharing this field's value stay in one split
    clean: CleanConfig = Field(default_factory=CleanConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # Reviewed label decisions (JSONL, written by `tunesmith ui` Review labels), applied to training and
    # validation rows, never to test rows: data/corrections.py.
    corrections: Path | None = None

    @field_validator("train", "test", "validation", mode="before")
    @classmethod
    def _sources(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, float) and not math.isfinite(v):  # else named as a bad path, the union's first member
            raise ValueError("a fraction must lie strictly between 0 and 1")
        return as_sources(v, str(info.field_name))

    @field_validator("validation", "test")
    @classmethod
    def _fraction(cls, v: Any) -> Any:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("a fraction must lie strictly between 0 and 1")
        return v

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: dict[str, str]) -> dict[str, str]:
        return check_columns(v, ("data", "columns"))

    def sources(self, key: str) -> list[DataSource]:
        """data.KEY as a list of sources (a single path is one source; a fraction or None none)."""
        value = getattr(self, key)
        if isinstance(value, Path):
            return [DataSource(path=str(value))]
        return list(value) if isinstance(value, list) else []


class Bound(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_side(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}: no value could meet it")
        return self


class ObjectiveConfig(_Strict):
    """The measurable objective the run is judged against."""

    # None: the task's first metric (accuracy, exact_match, perplexity; preference_accuracy for dpo, orpo
    # and simpo), filled in by Project so the resolved config records it.
    metric: str | None = None
    target: float | None = None
    min_gain: float | None = None
    # estimate: the measured gain must reach min_gain; ci_low: the lower end of its 95% interval must.
    min_gain_on: Literal["estimate", "ci_low"] = "estimate"
    constraints: dict[str, Bound] = Field(default_factory=dict)
    # How much worse (in the metric's units) a challenger may be on the champion's test split and still
    # be promoted: judged on the 95% interval of challenger - champion (see `tunesmith retrain`).
    tolerance: float = Field(0.01, ge=0, lt=1)
    _metric_defaulted: bool = PrivateAttr(default=False)  # set where Project filled `metric` in

    @property
    def metric_defaulted(self) -> bool:
        """Whether `metric` is the default Project chose for the method (not written in the config)."""
        return self._metric_defaulted


class TrainConfig(_Strict):
    """Technique and optimisation settings."""

    method: str = "lora"
    epochs: float = Field(2.0, gt=0, le=10_000)   # past it the step count and estimates leave any range
    max_steps: int | None = Field(None, ge=1, le=10_000_000)   # beyond it no run ends (select estimated 1.8e20 s)
    # None: the method's own default (registry.METHOD_SPECS); the resolved config records the value used.
    learning_rate: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1, le=4096)   # micro-batches per step (each one a forward and backward)
    # Batches per length-sorted group (1: random batches); see batching.length_grouped_batches.
    length_grouping: int = Field(32, ge=1)
    # AdamW's decoupled decay scales the trained weights by 1 - learning_rate x weight_decay each step; usual
    # values are 0 to 0.1. Past 10 a step can flip and grow them: a NaN loss blamed on the learning rate.
    weight_decay: float = Field(0.0, ge=0, le=10)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: int | None = Field(None, ge=1)
    early_stopping: bool = True
    patience: int = Field(3, ge=1)
    max_val_examples: int = Field(200, ge=1)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    seed: int = Field(42, ge=0, lt=2**32)  # numpy's seeds are 32-bit
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    neftune_alpha: float | None = Field(None, gt=0, le=100)   # NEFTune's paper uses 5 to 15
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    checkpoint_every: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    # Under torchrun/accelerate launch: shard decoder layers across ranks (FSDP2) instead of replicating them.
    fsdp: bool = False
    # Batches filled to a token budget (rows x longest row) instead of batch_size rows; None: batch_size rows.
    batch_tokens: int | None = Field(None, ge=1)
    # Several generation/chat examples per row of task.max_length, attention kept inside each (train/packing.py).
    packing: bool = False
    # Recompute each decoder layer's activations in backward instead of keeping them (less memory, more
    # compute); "auto": only when the memory estimate says the run would not fit otherwise.
    gradient_checkpointing: Literal["auto", True, False] = "auto"
    # torch.compile each decoder layer (one compiled function for all, dynamic shapes); the first steps pay the
    # compilation. Not with gradient checkpointing or FSDP (those runs train uncompiled). train/compiled.py.
    compile: bool = False
    # Load the frozen base through bitsandbytes (4-bit NF4 or 8-bit) and train LoRA/DoRA on top (QLoRA).
    quantize: Literal["nf4", "int8", "none"] = "none"
    # AdamW with 8-bit state (bitsandbytes); "paged_adamw_8bit" pages its state out of GPU memory (CUDA only).
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    prompt_tuning: PromptTuningSettings = Field(default_factory=PromptTuningSettings)
    prefix_tuning: PrefixTuningSettings = Field(default_factory=PrefixTuningSettings)
    prompt_optimization: PromptSearchSettings = Field(default_factory=PromptSearchSettings)
    overfit: OverfitSettings = Field(default_factory=OverfitSettings)
    # Temperature of DPO, SimPO and KTO (how far from the reference / how sharp the preference); TRL's default.
    beta: float = Field(0.1, gt=0)
    preference: PreferenceSettings = Field(default_factory=PreferenceSettings)
    # A finished run's directory: train on top of its fine-tuned model (adapter merged in) instead of `model`,
    # e.g. DPO after SFT; that model is then the baseline and DPO's reference. Relative to the config file.
    init_from: Path | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown method '{v}' (available: {', '.join(METHODS)})")
        return v

    @model_validator(mode="after")
    def _fsdp_method(self) -> TrainConfig:
        if self.fsdp and not METHOD_SPECS[self.method].fsdp:
            allowed = ", ".join(m for m in METHODS if METHOD_SPECS[m].fsdp and METHOD_SPECS[m].kind != "prompt")
            raise ValueError(f"train.fsdp does not support method '{self.method}' (its virtual tokens take a "
                             f"second pass through the sharded layers); use one of: {allowed}")
        return self

    @model_validator(mode="after")
    def _packing_method(self) -> TrainConfig:
        if self.packing and not METHOD_SPECS[self.method].packing:
            why = ("its rows are preference rows: a prompt with chosen and rejected answers, or for kto one "
                   "answer and a label, batched as such" if METHOD_SPECS[self.method].preference else
                   "its virtual tokens would come once per row, not once per example")
            raise _KeyedError(("train", "packing"), f"train.packing does not support method '{self.method}' ({why}); "
                              "set it to false")
        return self

    @model_validator(mode="after")
    def _quantize_method(self) -> TrainConfig:
        if self.quantize != "none" and not METHOD_SPECS[self.method].quantizable:
            allowed = ", ".join(m for m in METHODS if METHOD_SPECS[m].quantizable)
            why = ("the preference loop does not load a quantized base" if METHOD_SPECS[self.method].preference
                   else "it would train the quantized weights themselves")
            raise _KeyedError(("train", "quantize"), f"train.quantize={self.quantize} does not support method "
                              f"'{self.method}' ({why}); use one of: {allowed}, or set train.quantize to none")
        if self.quantize != "none" and self.fsdp:
            raise _KeyedError(("train", "quantize"), "train.quantize cannot be combined with train.fsdp (quantized "
                              "weights are not sharded); set one of them off")
        return self

    @model_validator(mode="after")
    def _preference_keys(self) -> TrainConfig:
        """Keys the preference loop (train/preference_fit.py) does not implement are refused by name, not
        ignored, when set to anything but their default (a saved config.yaml spells out every default)."""
        if not METHOD_SPECS[self.method].preference:
            return self
        fields = TrainConfig.model_fields
        for key in PREFERENCE_UNUSED_TRAIN_KEYS:
            if getattr(self, key) != fields[key].get_default(call_default_factory=True):
                raise _KeyedError(("train", key), f"train.{key} is not supported with train.method {self.method} "
                                  "(the preference loop does not implement it); remove it")
        if self.method == "kto" and self.batch_size < 2:
            raise _KeyedError(("train", "batch_size"), "train.method kto needs train.batch_size 2 or more: its KL "
                              "estimate pairs each prompt with another row's completion of the batch, and with one "
                              "row that would be its own (TRL's KTOTrainer refuses it too)")
        return self

    @model_validator(mode="after")
    def _method_learning_rate(self) -> TrainConfig:
        if self.learning_rate is None:
            self.learning_rate = METHOD_SPECS[self.method].learning_rate
        return self


class SuiteConfig(_Strict):
    """An extra evaluation set (e.g. a general task, to catch forgetting), scored for both models."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    data: Path
    task: TaskConfig = Field(default_factory=TaskConfig)
    metric: str | None = None                 # the figure the report leads with (default: the first metric)
    max_examples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _metric_fits_task(self) -> SuiteConfig:
        if self.task.type == "text":  # a suite is scored as predictions; raw text makes none
            raise ValueError("a benchmark suite is scored on predictions: task.type text does not apply; use "
                             "classification, generation or chat")
        names = metric_names(self.task.type)
        if self.metric is not None and self.metric not in names:
            raise ValueError(f"unknown metric '{self.metric}' for a {self.task.type} suite "
                             f"(available: {', '.join(names)})")
        return self


class Project(_Strict):
    """A whole project.yaml. `source` is the config file it came from."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    model: str = "smollm2-135m-instruct"
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    fairness: FairnessConfig = Field(default_factory=FairnessConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    benchmarks: list[SuiteConfig] = Field(default_factory=list)
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Project:
        """Two suites of one name were both scored and one of them lost from metrics.json; a group field
        twice would be audited twice."""
        names = [suite.name for suite in self.benchmarks]
        if twice := next((n for i, n in enumerate(names) if n in names[:i]), None):
            raise _KeyedError(("benchmarks",), f"two suites are named '{twice}'; give each its own name")
        fields = self.fairness.group_fields
        if twice := next((f for i, f in enumerate(fields) if f in fields[:i]), None):
            raise _KeyedError(("fairness", "group_fields"), f"'{twice}' is listed twice; list each field once")
        return self

    @model_validator(mode="after")
    def _preference_task(self) -> Project:
        if METHOD_SPECS[self.train.method].preference and self.task.type not in ("generation", "chat"):
            raise _KeyedError(("train", "method"), f"train.method {self.train.method} trains answers to prompts; "
                              "set task.type to generation or chat")
        return self

    @model_validator(mode="after")
    def _metric_fits_task(self) -> Project:
        names = metric_names(self.task.type)
        if METHOD_SPECS[self.train.method].preference:  # pair figures are measured on held-out pairs
            names = metric_names("preference") + names
        if self.objective.metric is None:  # KTO rows are no pairs: a KTO test split may hold none to score
            self.objective.metric = names[0] if self.train.method != "kto" else metric_names(self.task.type)[0]
            self.objective._metric_defaulted = True
        if self.objective.metric not in names:
            raise _KeyedError(("objective", "metric"), f"unknown metric '{self.objective.metric}' for a "
                              f"{self.task.type} task (available: {', '.join(names)})")
        self._reachable(names)
        figures = set(names) | set(CONSTRAINT_FIGURES)
        for key in self.objective.constraints:
            if key not in figures:
                raise _KeyedError(("objective", "constraints", key), f"unknown constraint '{key}' "
                                  f"(measured figures: {', '.join(sorted(figures))})")
            if key in FAIRNESS_FIGURES and not self.fairness.enabled:
                raise _KeyedError(("objective", "constraints", key), f"'{key}' is measured by the audit stage; "
                                  "set fairness.group_fields or fairness.lexicon")
            if key == "counterfactual_flip_rate" and self.fairness.counterfactual_examples == 0:
                raise _KeyedError(("objective", "constraints", key), "fairness.counterfactual_examples is 0, so "
                                  "no swap is measured; raise it or drop the constraint")
        if self.fairness.enabled and self.task.type != "classification":
            raise _KeyedError(("fairness",), "the fairness audit needs a classification task")
        return self

    def _reachable(self, names: list[str]) -> None:
        """A target, gain or bound no value of its figure can meet (accuracy 5, ece below 0) is refused: the
        run would train for a verdict decided before it started. Figures in [0, 1] and counts are checked."""
        objective, spec = self.objective, METRIC_SPECS.get(self.objective.metric)
        unit = spec is not None and spec.unit_interval
        if unit and objective.target is not None and not 0 <= objective.target <= 1:
            raise _KeyedError(("objective", "target"), f"{objective.metric} lies in [0, 1]: {objective.target:g} "
                              "can never be met")
        if unit and objective.min_gain is not None and objective.min_gain > 1:
            raise _KeyedError(("objective", "min_gain"), f"{objective.metric} lies in [0, 1]: a gain of "
                              f"{objective.min_gain:g} can never be met")
        for key, bound in objective.constraints.items():
            low = None if key == "reward_margin" else 0.0  # every other figure measured is >= 0
            high = 1.0 if (key in METRIC_SPECS and METRIC_SPECS[key].unit_interval) or key in ("ece",) else None
            if low is not None and bound.max is not None and bound.max < low:
                raise _KeyedError(("objective", "constraints", key), f"max {bound.max:g} is below {low:g}, the "
                                  f"least {key} can be")
            if high is not None and bound.min is not None and bound.min > high:
                raise _KeyedError(("objective", "constraints", key), f"min {bound.min:g} is above {high:g}, the "
                                  f"most {key} can be")

    @model_validator(mode="after")
    def _text_task_fits(self) -> Project:
        """task.type text trains on raw documents and is judged on held-out loss: keys about labels,
        prompts or answers, and stages that compare generated predictions, are refused by name."""
        if self.task.type != "text":
            return self
        # Non-default values, not keys present: a run's saved config.yaml spells out every default.
        fields = TaskConfig.model_fields
        for key in [k for k in TEXT_UNUSED_TASK_KEYS if k in fields and getattr(self.task, k) != fields[k].get_default(
                call_default_factory=True)]:
            raise _KeyedError(("task", key), f"task.{key} does not apply to task.type text (raw documents, loss "
                              "on every token); remove it")
        spec = METHOD_SPECS[self.train.method]
        refused = {("train", "method"): spec.kind == "prompt" or getattr(spec, "preference", False),
                   ("optimize", "enabled"): self.optimize.enabled,
                   ("eval", "judge", "enabled"): self.eval.judge.enabled,
                   ("eval", "harness", "tasks"): bool(self.eval.harness.tasks), ("benchmarks",): bool(self.benchmarks)}
        for loc, bad in refused.items():
            if bad:
                raise _KeyedError(loc, f"{'.'.join(loc)} is not supported for task.type text (it is judged on "
                                  "held-out perplexity; nothing is generated or compared as predictions)")
        return self

    @model_validator(mode="after")
    def _batch_plan_fits_task(self) -> Project:
        budget = self.train.batch_tokens
        if budget is not None and budget < self.task.max_length:
            raise _KeyedError(("train", "batch_tokens"), f"train.batch_tokens={budget} is smaller than one row of "
                              f"task.max_length={self.task.max_length} tokens; raise it or lower task.max_length")
        # Classification prompts share their long system text, computed once per batch (tasks/cache.py), and
        # answer in a label or two: packing would recompute that text per example to save little padding.
        if self.train.packing and self.task.type == "classification":
            raise _KeyedError(("train", "packing"), "train.packing is for generation and chat tasks; a "
                              "classification batch already shares its prompt prefix; set it to false")
        return self

    @model_validator(mode="after")
    def _oversampling_has_classes(self) -> Project:
        """Oversampling evens out class counts; a generation answer is no class (each would be its own, and
        every row copied up to the target)."""
        if self.data.augment.oversample_to is not None and self.task.type != "classification":
            raise _KeyedError(("data", "augment", "oversample_to"), "data.augment.oversample_to copies rows of "
                              f"rarer classes; a {self.task.type} task has no classes; remove it")
        return self

    @model_validator(mode="after")
    def _columns_fit_task(self) -> Project:
        fields = COLUMN_FIELDS[self.task.type]
        for name in self.data.columns:
            if name not in fields:
                raise _KeyedError(("data", "columns", name), f"data.columns: '{name}' is not a field of a "
                                  f"{self.task.type} task (map one of: {', '.join(fields)})")
        return self

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()
