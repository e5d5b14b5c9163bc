"""The leaf settings groups nested in project.yaml's sections (cleaning steps, adapters, preference
tuning, decoding, optimised variants, the request log and drift): self-contained models with no
cross-field rules of other sections. `tunesmith.config.schema` builds the sections from them and
re-exports them, so `from tunesmith.config(.schema) import X` keeps working."""

from __future__ import annotations

import types
import typing
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class NumbersNotBools(BaseModel):
    """A model whose number fields refuse true/false (project.yaml's sections, the server's request bodies)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`max_steps: true` is refused, not read as 1 (pydantic's lax mode takes a bool for a number)."""
        if isinstance(value, bool) and _numeric_only(cls.model_fields[info.field_name].annotation):
            raise ValueError("a number is needed, not true/false")
        return value


class _Strict(NumbersNotBools):
    # allow_inf_nan off: an infinite learning rate or a NaN target trains a NaN model that still "passes"
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _numeric_only(annotation: Any) -> bool:
    """Whether a field's type takes numbers and never a bool (int, float, their optional and literal unions)."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    args = [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a for a in args]
    return any(a in (int, float) for a in args) and bool not in args


PII_TYPES = ("email", "phone", "card", "iban", "ip")


class NormalizeSettings(_Strict):
    """Text normalisation of inputs. Generation and chat targets (answers) are never normalised: markup,
    code and layout in an answer are what the model must learn to write."""

    # NFKC (ﬁ -> fi, x² -> x2). auto: classification inputs only: an extractive answer or code quoted from a
    # generation prompt must still match the prompt character for character.
    unicode: bool | Literal["auto"] = "auto"
    control_chars: bool = True    # every input: invisible characters carry no meaning, only risk
    # Tags removed, entities unescaped. auto: classification inputs only; true: the inputs of every task type.
    html: bool | Literal["auto"] = "auto"
    # Runs collapsed, ends stripped (indentation too). auto: classification inputs only; true: every input.
    whitespace: bool | Literal["auto"] = "auto"

    def applies(self, step: str, task_type: str) -> bool:
        """Whether the `unicode`, `html` or `whitespace` step runs on inputs of `task_type`."""
        value = getattr(self, step)
        return task_type == "classification" if value == "auto" else bool(value)


class NearDedupSettings(_Strict):
    enabled: bool = True
    # remove: drop each near duplicate (logged in removed.jsonl); report: keep it, list the pair in report.json.
    action: Literal["remove", "report"] = "remove"
    threshold: float = Field(0.7, gt=0.0, le=1.0)       # Jaccard of character shingles (checked exactly)
    num_perm: int = Field(128, ge=16, le=1024)
    ngram: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # auto: 3 for short texts, 5 for long ones


class SemanticDedupSettings(_Strict):
    # Off by default: on short texts a cosine this high also joins genuine paraphrases, which help training.
    enabled: bool = False
    action: Literal["remove", "report"] = "remove"
    threshold: float = Field(0.95, gt=0.0, le=1.0)      # cosine of all-MiniLM-L6-v2 embeddings


class PiiSettings(_Strict):
    enabled: bool = True
    action: Literal["redact", "drop", "report"] = "redact"
    # `person` (names, from census name lists: see data/pii.py) is opt-in: slower, and a heuristic.
    types: list[Literal["email", "phone", "card", "iban", "ip", "person"]] = Field(
        default_factory=lambda: list(PII_TYPES))


class DecontaminateSettings(_Strict):
    enabled: bool = True
    ngram: int = Field(8, ge=1)                          # word n-grams; shorter texts count whole
    min_overlap: float = Field(0.5, gt=0.0, le=1.0)      # share of a train row's n-grams seen in held-out rows


class LabelNoiseSettings(_Strict):
    enabled: bool = True
    # report: list suspects only; remove: drop them; relabel: give them the suggested label (logged in changes).
    action: Literal["report", "remove", "relabel"] = "report"
    folds: int = Field(5, ge=2)


class LoraConfig(_Strict):
    # Ranks past 1,024 are past any use (commonly 8 to 64) and would allocate adapters of any size; a rank
    # beyond the widest adapted layer is refused when the model loads (train/methods/lora.py).
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0)
    # PEFT's own default. On a CPU, dropout keeps an fp32 mask of every adapter's input for backward:
    # more activation memory and time (BENCHMARKS.md, "Quickstart host memory").
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Module names (PEFT matches a name or its suffix); one that matches no layer is refused when the model loads.
    target_modules: Annotated[list[str], Field(min_length=1)] | Literal["all-linear"] = "all-linear"


class PromptTuningSettings(_Strict):
    """Soft prompt: learned input embeddings placed before the prompt."""

    virtual_tokens: int = Field(20, ge=1, le=512)
    init: Literal["vocab", "random"] = "vocab"


class PrefixTuningSettings(_Strict):
    """Prefix tuning: learned keys/values placed before the prompt in every layer."""

    virtual_tokens: int = Field(10, ge=1, le=512)
    projection: bool = False


class PromptSearchSettings(_Strict):
    """prompt_optimization: candidate instructions x few-shot sets, scored on validation."""

    instructions: list[str] = Field(default_factory=list)
    # Worked examples per candidate prompt (each a count of shots, 0 to 32) and random draws of them:
    # every candidate is scored on the validation split, so both are bounded.
    shots: list[Annotated[int, Field(ge=0, le=32)]] = Field(default_factory=lambda: [0, 1, 3], min_length=1)
    draws: int = Field(2, ge=1, le=100)
    max_shot_chars: int = Field(400, ge=1)


class OverfitSettings(_Strict):
    """The overfitting detector."""

    evals: int = Field(3, ge=1)
    stop: bool = True


class PreferenceSettings(_Strict):
    """Settings of train.method dpo|orpo|simpo|kto; defaults are TRL's (ORPOConfig, CPOConfig, KTOConfig)."""

    # What trains: a LoRA/DoRA adapter (the reference of DPO/KTO is the base with the adapter switched off,
    # no second copy), or every weight (DPO/KTO then keep a frozen copy of the model as reference: 2x weights).
    adapter: Literal["lora", "dora", "full"] = "lora"
    orpo_lambda: float = Field(0.1, gt=0)            # ORPO's weight of the odds-ratio term (TRL ORPOConfig.beta)
    simpo_gamma: float = Field(0.5, ge=0)            # SimPO's target reward margin (TRL CPOConfig.simpo_gamma)
    kto_desirable_weight: float = Field(1.0, gt=0)   # KTO's weight of desirable / undesirable rows' losses
    kto_undesirable_weight: float = Field(1.0, gt=0)


STOP_STRINGS_MAX, STOP_STRING_CHARS = 4, 64   # bounds of `stop` (OpenAI's own limit is 4 strings)


SAMPLING_EPS = 1e-5  # a temperature below it decodes greedily


class GenerationSettings(_Strict):
    """How answers are decoded (eval.generation; serve requests carry the same fields). The defaults are
    greedy decoding: temperature 0 ignores top_p, top_k and seed."""

    temperature: float = Field(0.0, ge=0, le=2)     # 0 (or below 1e-5, as vLLM): greedy; above: sampling
    top_p: float = Field(1.0, gt=0, le=1)           # nucleus sampling: 1 keeps every token
    top_k: int = Field(0, ge=0, le=10_000)          # 0: off
    # 1: off; above 1 discourages repeats (CTRL's penalty). Logits are divided by it: below 0.01 they overflow.
    repetition_penalty: float = Field(1.0, ge=0.01, le=2)
    stop: list[str] = Field(default_factory=list, max_length=STOP_STRINGS_MAX)   # answers cut at the first one
    seed: int | None = Field(0, ge=0, lt=2**32)     # sampling seed: same seed, same answers; None: unseeded

    @field_validator("temperature")
    @classmethod
    def _tiny_is_greedy(cls, v: float) -> float:
        # Logits divided by a temperature near 0 overflow to inf and sampling fails; the distribution is
        # one-hot long before, so below SAMPLING_EPS the answer is the greedy one (vLLM's rule too).
        return 0.0 if v < SAMPLING_EPS else v

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, v: list[str]) -> list[str]:
        if any(not 0 < len(s) <= STOP_STRING_CHARS for s in v):
            raise ValueError(f"each stop string holds 1 to {STOP_STRING_CHARS} characters")
        return v

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class ParitySettings(_Strict):
    max_logit_diff: float = Field(1e-3, gt=0)        # merged vs adapter model, on `samples` test prompts
    min_agreement: float = Field(1.0, gt=0, le=1)    # share of test predictions the merged model must keep
    samples: int = Field(16, ge=1)


class Int8Settings(_Strict):
    smooth: bool = True                              # SmoothQuant before quantizing (activation outliers)
    alpha: float = Field(0.75, ge=0, le=1)           # how much of the outliers moves into the weights
    calibration_examples: int = Field(32, ge=1)      # training rows whose activations set the scales


class Int4Settings(_Strict):
    group_size: Literal[32, 64, 128, 256] = 32        # inputs sharing one scale and zero point (smaller: finer)


class PruneSettings(_Strict):
    sparsity: float = Field(0.3, gt=0, lt=1)          # pruned: share of linear weights set to zero
    layers: float = Field(0.25, gt=0, lt=1)           # pruned_layers: share of decoder layers removed
    recovery_steps: int = Field(40, ge=0)
    learning_rate: float = Field(5e-5, gt=0)


class DistillSettings(_Strict):
    layers: float = Field(0.5, gt=0, lt=1)            # distilled: share of decoder layers the student keeps
    steps: int = Field(120, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)             # weight of the teacher (soft) term against gold labels
    minilm_epochs: int = Field(8, ge=1)               # distilled_minilm
    minilm_learning_rate: float = Field(1e-4, gt=0)


class RequestLogSettings(_Strict):
    enabled: bool = True
    path: Path | None = None                   # default RUN_DIR/monitor/requests.db
    retention_days: float = Field(30, gt=0)
    redact_pii: bool = True                    # emails, phones, cards, IBANs, IPs replaced before storing


class MonitorSettings(_Strict):
    """Live quality on feedback-labelled traffic (`tunesmith monitor`, the server's quality gauges)."""

    # Alert when the upper end of the live interval falls below the accepted test figure minus this.
    max_quality_drop: float = Field(0.05, ge=0, lt=1)
    window_hours: float = Field(24.0, gt=0)       # live quality is computed per window of this length
    min_labelled: int = Field(30, ge=1)          # fewer labelled requests in a window: no verdict
    update_every: int = Field(20, ge=1)          # the server recomputes its quality gauges every N verdicts


class RetrainSettings(_Strict):
    """`tunesmith retrain`: how labelled traffic becomes a challenger's data."""

    holdout: float = Field(0.3, gt=0, lt=1)      # share of the newest labelled traffic kept as a second test set
    min_labelled: int = Field(30, ge=2)          # fewer labelled requests: nothing to retrain on (exit 2)
    min_holdout: int = Field(20, ge=1)           # the held-out traffic test set has at least this many rows
    traffic_weight: int = Field(1, ge=1, le=10)  # each labelled traffic row is repeated this often in training


class DriftSettings(_Strict):
    window: int = Field(500, ge=10, le=1_000_000)  # most recent requests compared with the training reference
    min_requests: int = Field(50, ge=5)        # fewer live requests than this: no verdict
    clusters: int = Field(8, ge=2)             # k-means clusters of training embeddings for the embedding PSI
    psi_threshold: float = Field(0.25, gt=0)   # PSI above this is drift (0.1-0.25 moderate, >0.25 major)
    p_value: float = Field(0.01, gt=0, lt=1)   # ... and only when a chi-square test rejects "no change" at this level
    length_psi_threshold: float = Field(0.25, gt=0)
    unknown_rate_threshold: float = Field(0.05, gt=0)   # increase of the share of tokens unseen in training
    confidence_drop_threshold: float = Field(0.1, gt=0)
    update_every: int = Field(50, ge=1)        # the server recomputes its drift gauges every N requests


def label_form(label: str) -> str:
    """A label as tunesmith stores and compares it: NFC, so "café" typed precomposed or as e + a combining
    accent is one label. Every place that reads a label (data, task.labels, corrections, fairness, feedback)
    compares this form."""
    return unicodedata.normalize("NFC", label)
