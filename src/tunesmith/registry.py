"""The name tables: fine-tuning methods, optimisation variants, metrics and measured figures.

Each fact about a method, variant or metric is written here once; the modules that implement them
are imported by name only when used. This module imports nothing heavy (no torch, nothing else from
tunesmith), so the config validates `train.method`, `optimize.variants` and `objective.metric` cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method.

    module: implementing module (see train/methods), or None for a method the estimator prices but
        training does not offer yet.
    kind: "adapter" (small saved delta on frozen weights), "full" (all weights) or "prompt" (text only).
    learning_rate: the default rate; soft prompts and scaling vectors need far larger steps than
        weight updates, full fine-tuning far smaller.
    sane_lr: (low, high) rates outside which the method rarely trains well (too small: nothing moves;
        too large: divergence); the pre-flight check warns outside it. None: no rate is used.
    flops_per_token: effective training FLOPs per parameter per token, for the time estimate: LoRA's
        4 (forward 2, backward 2) is the anchor models/estimate.EFFICIENCY is fitted on, and the others
        are 4 x LoRA's measured tokens/s over theirs on the same machine, so they carry whatever costs
        the FLOP count leaves out (measured, not profiled); None for a method that trains nothing.
    trained_share: share of the parameters that get optimiser state, for the memory estimate.
    fsdp: whether `train.fsdp` can shard it (virtual tokens take a second pass through sharded layers).
    low_precision_frozen: whether frozen weights may be kept in bf16 (DoRA normalises base + update
        weights itself, so its frozen weights keep full precision).
    weight_bytes: bytes per frozen weight in the memory estimate (fp32 4; 4-bit NF4 with its scales 0.56;
        DoRA 8.4: its fp32 weights and 4.4 bytes a weight more that its measured peaks hold, fitted, not profiled).
    activation_factor: its activations per row against LoRA's (DoRA 1.95, fitted on the same peaks; what
        its backward pass keeps beyond LoRA's is not profiled).
    quantizable: whether `train.quantize` may load the frozen base through bitsandbytes (the method
        trains adapters beside the base's linear layers, never the quantized weights themselves).
    trains_as: for an estimate-only row (module None), the config that trains it, as dotted keys.
    packing: whether `train.packing` can put several examples in one row (virtual tokens would come
        once before a whole row, not before each example).
    preference: whether it trains on preference rows (train/preference_fit.py) instead of targets.
    reference: whether its loss scores against a frozen reference model (DPO, KTO): the policy with its
        adapter switched off, or, where every weight trains, a second copy of the model.
    """

    module: str | None
    kind: Literal["adapter", "full", "prompt"]
    learning_rate: float
    sane_lr: tuple[float, float] | None
    flops_per_token: float | None
    trained_share: float | None
    fsdp: bool = True
    low_precision_frozen: bool = True
    weight_bytes: float = 4.0
    activation_factor: float = 1.0
    quantizable: bool = False
    trains_as: tuple[tuple[str, str], ...] = ()
    packing: bool = True
    preference: bool = False
    reference: bool = False


_M = "tunesmith.train.methods."
# Time and memory factors fitted on the quickstart (CPU, bf16, 2026-12-05; BENCHMARKS.md, "Model and
# technique selection"): LoRA 627 tokens/s, full 324, DoRA 243, IA3 677, prompt tuning 707; DoRA's
# memory on its peaks at batch 4, 8 and 32 (2026-12-06).
METHOD_SPECS: dict[str, MethodSpec] = {
    "lora": MethodSpec(_M + "lora", "adapter", 2e-4, (1e-5, 1e-2), 4, 0.01, quantizable=True),
    "dora": MethodSpec(_M + "dora", "adapter", 2e-4, (1e-5, 1e-2), 10.3, 0.011, low_precision_frozen=False,
                       weight_bytes=8.4, activation_factor=1.95, quantizable=True),
    "ia3": MethodSpec(_M + "ia3", "adapter", 3e-3, (1e-4, 1e-1), 3.7, 0.0005),
    "full": MethodSpec(_M + "full", "full", 2e-5, (1e-7, 1e-4), 7.7, 1.0),
    # Prefix tuning is priced as prompt tuning (virtual tokens only), not measured on its own.
    "prompt_tuning": MethodSpec(_M + "prompt_tuning", "adapter", 3e-2, (1e-4, 5e-1), 3.5, 0.0001, fsdp=False,
                                packing=False),
    "prefix_tuning": MethodSpec(_M + "prefix_tuning", "adapter", 1e-2, (1e-4, 1e-1), 3.5, 0.002, fsdp=False,
                                packing=False),
    # A search over instructions: forward passes only, nothing trained, no learning rate used.
    "prompt_optimization": MethodSpec(_M + "prompt_optimization", "prompt", 1e-4, None, None, None),
    # QLoRA is LoRA over an NF4-quantized base: select prices it as its own row, `train` runs it as below
    # (dequantising each layer's weights costs the extra 0.4 FLOPs per parameter and token; GPU only,
    # not measured).
    "qlora": MethodSpec(None, "adapter", 2e-4, (1e-5, 1e-2), 4.4, 0.01, weight_bytes=0.56,
                        trains_as=(("train.method", "lora"), ("train.quantize", "nf4"))),
    # Preference tuning on {prompt, chosen, rejected} (KTO: {prompt, completion, label}) rows, through a
    # LoRA adapter by default (train.preference.adapter); DPO and KTO add a reference forward (no gradient,
    # 1 FLOP more per parameter and token). The rate suits LoRA; full fine-tuning wants ~100x less.
    **{name: MethodSpec(_M + "preference", "adapter", rate, (1e-7, 1e-3), flops, 0.01, fsdp=False, packing=False,
                        preference=True, reference=ref)
       for name, rate, flops, ref in (("dpo", 5e-5, 5, True), ("orpo", 5e-5, 4, False), ("simpo", 5e-5, 4, False),
                                      ("kto", 5e-5, 5, True))},
}
# The methods `train.method` accepts.
METHODS: tuple[str, ...] = tuple(name for name, spec in METHOD_SPECS.items() if spec.module)

_V = "tunesmith.optimize.variants."
VARIANTS: dict[str, str] = {name: _V + name for name in (
    "merged", "int8", "int8_weights", "int4_weights", "bf16", "pruned", "pruned_layers", "distilled",
    "distilled_minilm", "ct2", "onnx", "onnx_int8")}
# What `tunesmith optimize` builds when the config names nothing: every variant that needs no
# training (seconds to build); the pruned and distilled ones train for a while and are opt-in.
DEFAULT_VARIANTS: tuple[str, ...] = ("merged", "int8", "bf16")


@dataclass(frozen=True)
class MetricSpec:
    """A task metric. `cost` > 1 marks corpus-level metrics that are slow to recompute, so the
    bootstrap uses fewer resamples for them. The function is in tasks/metrics.py under the same name."""

    name: str
    tasks: tuple[str, ...]
    higher_is_better: bool = True
    cost: int = 1
    unit_interval: bool = True   # its values lie in [0, 1] (the report plots those on one axis)


CLASSIFICATION = ("classification",)
GENERATION = ("generation", "chat")
TEXT = ("text",)
PREFERENCE = ("preference",)
METRIC_SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in (
    MetricSpec("accuracy", CLASSIFICATION),
    MetricSpec("f1_macro", CLASSIFICATION),
    MetricSpec("precision_macro", CLASSIFICATION),
    MetricSpec("recall_macro", CLASSIFICATION),
    MetricSpec("f1_micro", CLASSIFICATION),
    MetricSpec("exact_match", GENERATION),
    MetricSpec("token_f1", GENERATION),      # SQuAD v1.1 token-bag F1
    MetricSpec("rouge_l", GENERATION),
    MetricSpec("bleu", GENERATION, cost=5),
    MetricSpec("chrf", GENERATION, cost=5),
    # Preference pairs (train.method dpo|orpo|simpo|kto): see train/preference.py for the definitions.
    MetricSpec("preference_accuracy", PREFERENCE),
    MetricSpec("reward_margin", PREFERENCE, unit_interval=False),   # nats
    # task.type text: held-out token loss and its exp; lower is better (see tasks/metrics.py).
    MetricSpec("perplexity", TEXT, higher_is_better=False, unit_interval=False),
    MetricSpec("token_loss", TEXT, higher_is_better=False, unit_interval=False),   # nats
)}
# The figures measured on preference pairs (margins), not on answers: training validation, eval and report.
PREFERENCE_METRICS: tuple[str, ...] = tuple(name for name, m in METRIC_SPECS.items() if m.tasks == PREFERENCE)

# Figures from the fairness audit (fairness.group_fields or fairness.lexicon): the worst-case group
# disparities (each with a bootstrap interval), then the counterfactual flip rate (lexicon probes).
DISPARITY_FIGURES: tuple[str, ...] = ("demographic_parity_difference", "demographic_parity_ratio",
                                      "equal_opportunity_difference", "equalized_odds_difference")
FAIRNESS_FIGURES: tuple[str, ...] = DISPARITY_FIGURES + ("counterfactual_flip_rate",)
# Figures other than task metrics that an objective constraint may name.
CONSTRAINT_FIGURES: tuple[str, ...] = ("latency_p50_ms", "latency_p95_ms", "model_size_mb", "peak_rss_mb",
                                       "gpu_peak_mb", "train_seconds", "tokens_per_second", "trainable_params",
                                       "throughput_eps", "ece", "perplexity") + FAIRNESS_FIGURES


# Figures every validation record of a task type holds besides val_loss and the objective metric (the
# trainer logs them; `tunesmith ui`'s watch page charts them).
VALIDATION_FIGURES: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "precision_macro", "recall_macro", "f1_macro"),
}


def metric_names(task_type: str) -> list[str]:
    """The metrics computed for a task type, in registration order."""
    return [m.name for m in METRIC_SPECS.values() if task_type in m.tasks]



# Built-in chat templates (task.chat_template: NAME). Each renders any role, so conversations with
# tool turns render too, and ends every turn with a token the model stops at: ChatML's <|im_end|>,
# Llama 3's <|eot_id|> (both must be in the tokenizer's vocabulary; the pre-flight checks), Zephyr's
# eos_token (whatever the tokenizer's EOS is). `model` (the default) is the tokenizer's own template.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
               " + '<|im_end|>' + '\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role']"
               " + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "zephyr": ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token"
               " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
}
