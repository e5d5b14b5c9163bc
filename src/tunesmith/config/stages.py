"""The sections of project.yaml read by the stages after training: eval (and its judge and harness),
optimize, serve, fairness and export. `tunesmith.config.schema` puts them into `Project` and
re-exports them."""

from __future__ import annotations

import ipaddress
import urllib.parse
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunesmith.config.settings import (
    DistillSettings,
    DriftSettings,
    GenerationSettings,
    Int4Settings,
    Int8Settings,
    ParitySettings,
    PruneSettings,
    RequestLogSettings,
    _Strict,
    label_form,
)
from tunesmith.config.sources import KeyedError as _KeyedError
from tunesmith.registry import (
    DEFAULT_VARIANTS,
    VARIANTS,
)


class JudgeConfig(_Strict):
    """Optional LLM judge of baseline vs fine-tuned answers (off by default)."""

    enabled: bool = False
    endpoint: str | None = None          # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    model: str | None = None             # the endpoint's model name, or a local model when no endpoint
    api_key_env: str | None = "OPENAI_API_KEY"
    # Variables api_key_env may name besides *_API_KEY ones: a config must not be able to send any
    # secret in the environment (AWS_SECRET_ACCESS_KEY, ...) to an endpoint it chooses.
    allowed_env: list[str] = Field(default_factory=list)
    allow_insecure: bool = False         # allow a plain http:// endpoint that is not on loopback
    rubric: str = ("You are an impartial grader. Judge each answer first on whether it agrees with the "
                   "reference answer, then on clarity and concision.")
    mode: Literal["single", "pairwise", "both"] = "both"
    max_examples: int = Field(50, ge=1)
    timeout_s: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _has_a_judge(self) -> JudgeConfig:
        if self.enabled and not (self.endpoint or self.model):
            raise ValueError("give eval.judge.endpoint (OpenAI-compatible URL) or eval.judge.model (a local model)")
        return self

    @model_validator(mode="after")
    def _key_variable_is_allowed(self) -> JudgeConfig:
        name = self.api_key_env
        if name and not (name.endswith("_API_KEY") or name in self.allowed_env):
            raise _KeyedError(("eval", "judge", "api_key_env"), f"'{name}' is not an API-key variable: only "
                              "names ending in _API_KEY or listed in eval.judge.allowed_env may be sent to the judge")
        return self

    @model_validator(mode="after")
    def _endpoint_is_safe(self) -> JudgeConfig:
        if not self.endpoint:
            return self
        if any(c.isspace() or not c.isprintable() for c in self.endpoint):
            # urlsplit drops tabs and newlines that the HTTP client would not: the URL checked here would
            # not be the URL that is called
            raise _KeyedError(("eval", "judge", "endpoint"), "the URL holds a space or a control character")
        url = urllib.parse.urlsplit(self.endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise _KeyedError(("eval", "judge", "endpoint"), f"'{self.endpoint}' is not an http(s) URL")
        if url.scheme == "http" and not self.allow_insecure and not _is_loopback(url.hostname):
            raise _KeyedError(("eval", "judge", "endpoint"), "a plain http:// judge (the key and the test "
                              "data travel unencrypted) is allowed only on loopback; use https:// or set "
                              "eval.judge.allow_insecure: true")
        return self


def _is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (a name other than localhost is not trusted to resolve there)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HarnessConfig(_Strict):
    """lm-evaluation-harness tasks run on both models (needs `pip install lm-eval`); off when `tasks` is empty."""

    tasks: list[str] = Field(default_factory=list)  # task names: built-in ones need their datasets locally
    include_path: Path | None = None                # a folder of task YAMLs (local datasets), relative to the config
    limit: int | None = Field(None, ge=1)           # examples per task
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, ge=1)
    apply_chat_template: bool = False


class EvalConfig(_Strict):
    batch_size: int = Field(16, ge=1)
    max_examples: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(64, ge=1, le=32768)
    latency_samples: int = Field(20, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = "fp32"
    forgetting_probe: bool = True
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000)   # paired bootstrap of baseline vs fine-tuned
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's seeds are 32-bit
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    harness: HarnessConfig = Field(default_factory=HarnessConfig)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    report_examples: int = Field(10, ge=0, le=1000)   # test prompts shown side by side in report.html


class OptimizeConfig(_Strict):
    """Inference variants of the fine-tuned model, each measured against it (see optimize/)."""

    enabled: bool = False                # part of `tunesmith run`; `tunesmith optimize RUN_DIR` always runs
    variants: list[str] = Field(default_factory=lambda: list(DEFAULT_VARIANTS))
    max_quality_drop: float = Field(0.02, ge=0)   # objective-metric units a variant may lose and still be offered
    latency_samples: int = Field(30, ge=1)
    throughput_batch_size: int = Field(16, ge=1)
    parity: ParitySettings = Field(default_factory=ParitySettings)
    int8: Int8Settings = Field(default_factory=Int8Settings)
    int4: Int4Settings = Field(default_factory=Int4Settings)
    prune: PruneSettings = Field(default_factory=PruneSettings)
    distill: DistillSettings = Field(default_factory=DistillSettings)

    @field_validator("variants")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [n for n in v if n not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant '{unknown[0]}' (available: {', '.join(VARIANTS)})")
        if len(set(v)) != len(v) or "fp32" in v:
            raise ValueError("list each variant once; fp32 (the fine-tuned model itself) is always measured")
        return v


class ServeConfig(_Strict):
    """`tunesmith serve` limits, batching, request log and drift settings."""

    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_tokens: int = Field(256, ge=1)          # upper limit of a request's max_tokens
    max_texts: int = Field(64, ge=1)            # texts per /v1/classify request
    rate_limit_per_minute: int = Field(600, ge=1)   # per API key
    max_batch: int = Field(32, ge=1)            # dynamic micro-batching: requests per model call
    max_wait_ms: float = Field(5.0, ge=0)       # how long a batch waits for company
    # Most tokens in one model call, rows x (longest prompt + largest max_tokens, or for a classifier
    # the longest label answer): bounds the memory of a forward pass however many requests batch up.
    max_batch_tokens: int = Field(8192, ge=64)
    max_queue: int = Field(64, ge=1)            # requests waiting for the model; beyond it: 503 + Retry-After
    request_timeout_s: float = Field(30.0, gt=0, le=3600)   # unanswered by then: 503 + Retry-After
    body_timeout_s: float = Field(10.0, gt=0, le=3600)      # body not all read by then: 408; no whole head: closed
    max_concurrency: int = Field(256, ge=1)     # open connections (and requests) at once: serve/connections.py
    request_log: RequestLogSettings = Field(default_factory=RequestLogSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)


class FairnessConfig(_Strict):
    """The audit stage: groups, the label of interest, probes and mitigation (see fairness/)."""

    group_fields: list[str] = Field(default_factory=list)        # columns naming each row's group
    lexicon: list[Literal["gender", "race_ethnicity", "religion", "age", "disability", "nationality",
                          "sexual_orientation"]] = Field(default_factory=list)   # identity terms found in the text
    positive_label: list[str] | str | None = None   # label(s) counting as the selected outcome; default: all labels
    min_group_size: int = Field(10, ge=1)           # smaller groups are listed but not compared
    under_represented: float = Field(0.05, gt=0, lt=1)   # a group with less than this share of training rows is flagged
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000)
    counterfactual_examples: int = Field(200, ge=0)  # test rows with an identity term, each swapped with other terms
    stereotype_pairs: int = Field(0, ge=0)           # CrowS-Pairs pairs scored before and after fine-tuning (0: off)
    threshold_optimizer: Literal["off", "demographic_parity", "equalized_odds"] = "demographic_parity"
    mitigation: Literal["none", "reweight", "augment"] = "none"   # applied while training

    @model_validator(mode="after")
    def _attributes_apart(self) -> FairnessConfig:
        """Each attribute is audited under its name: a column named like a lexicon category listed too would
        be one attribute, and the text's terms would replace the column's groups without a word."""
        if both := next((f for f in self.group_fields if f in self.lexicon), None):
            raise _KeyedError(("fairness", "group_fields"), f"'{both}' is both a group column and a fairness.lexicon "
                              "category; audit one of them (drop it from one list), or rename the column")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.group_fields or self.lexicon)

    @property
    def positive_labels(self) -> list[str] | None:
        if self.positive_label is None:
            return None
        given = [self.positive_label] if isinstance(self.positive_label, str) else list(self.positive_label)
        return [label_form(x) for x in given]  # as the data's labels are read


class ExportConfig(_Strict):
    """`tunesmith export` settings (the run's config.yaml `export:` section)."""

    # Least share of test predictions a read-back export must share with the run; None: the format's
    # default (0.98 for hf, gguf f16 and q8_0; 0.90 for gguf q4_K_M). --min-agreement overrides it.
    min_agreement: float | None = Field(None, ge=0, le=1)
