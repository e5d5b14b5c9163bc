"""Parity of tunesmith's own forward paths with each family's forward, on tiny random models.

tunesmith runs the decoder and the LM head separately (training loss, constrained scoring) and reuses
a shared-prefix key/value cache, so each family is checked against what its own `forward` computes:
training loss, label scores (sequence and constrained), LoRA targets in every layer, merge parity.
Configs are built in-process (2 layers, hidden 32) and saved next to the tiny test tokenizer.
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import pytest
import torch
import transformers

from tunesmith.config.schema import LoraConfig
from tunesmith.data.examples import Example
from tunesmith.models.catalog import CATALOG, TESTED_FAMILIES
from tunesmith.models.load import load_model, load_tokenizer, plain_lm
from tunesmith.tasks.cache import common_prefix_len
from tunesmith.tasks.classification import score_labels, score_labels_constrained
from tunesmith.tasks.prompts import PromptFormat, encode_answer
from tunesmith.train.batching import IGNORE, collate, encode_for_training
from tunesmith.train.loss import supervised_loss
from tunesmith.train.methods import lora

# "alpha" and "alpha beta" share their first tokens, so constrained scoring runs a label tree too.
LABELS = ["alpha", "alpha beta", "beta", "gamma"]
TEXTS = ["my card was red today", "where is the blue bank", "green money please now", "how can you help",
         "the red card is my card and the bank said no", "blue"]
WINDOW = 8  # sliding windows shorter than the shared prompt, so caches that drop old keys would show
# Family -> (config class, family-specific settings). Keys are transformers model_type values (catalog.family).
FAMILIES = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 8}),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}),
    # A soft cap small enough to change these tiny models' logits (real Gemma 2 uses 30 on larger logits).
    "gemma2": ("Gemma2Config", {"head_dim": 8, "sliding_window": WINDOW, "final_logit_softcapping": 2.0,
                                "query_pre_attn_scalar": 8}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8, "sliding_window": WINDOW, "query_pre_attn_scalar": 8,
                                         "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("Phi3Config", {}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                     "shared_expert_intermediate_size": 16}),
}


def build_family(family: str, folder, tokenizer_dir):
    """A 2-layer random `family` checkpoint saved in `folder` with the tiny test tokenizer."""
    tok = load_tokenizer(tokenizer_dir)
    name, extra = FAMILIES[family]
    config = getattr(transformers, name)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        initializer_range=0.2,  # logits of a few units, so log-probabilities are far from uniform
        **extra)
    assert config.model_type == family
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory, tiny_model):
    """(family, model, tokenizer) loaded through tunesmith's loader, in eval mode."""
    path = build_family(request.param, tmp_path_factory.mktemp(request.param), tiny_model)
    return request.param, load_model(path), load_tokenizer(path)


def _encoded(tok):
    fmt = PromptFormat("classification", "Classify.", LABELS, True, 256)
    examples = [Example(t, LABELS[i % len(LABELS)], "test") for i, t in enumerate(TEXTS)]
    return fmt, encode_for_training(tok, fmt, examples)


def _reference_loss(model, batch):
    """The model's own forward loss on the same rows, shared prefix written out in every row."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prefix = batch.get("prefix_ids", ids.new_zeros(0))[None].expand(len(ids), -1)   # (B, P)
    return model(input_ids=torch.cat([prefix, ids], 1),
                 attention_mask=torch.cat([torch.ones_like(prefix), mask], 1),
                 labels=torch.cat([torch.full_like(prefix, IGNORE), labels], 1)).loss


@torch.no_grad()
def test_training_loss_equals_model_forward(family_model):
    family, model, tok = family_model
    _, enc = _encoded(tok)
    n_prefix = common_prefix_len([e.ids[:e.n_prompt] for e in enc])
    assert n_prefix > WINDOW  # the shared prefix alone is longer than the sliding windows
    for prefix_len in (0, n_prefix):
        batch = collate(enc, tok.pad_token_id, prefix_len)
        loss, n = supervised_loss(model, batch)
        assert n == int((batch["labels"][:, 1:] != IGNORE).sum())
        assert abs(loss.item() - _reference_loss(model, batch).item()) < 1e-5, (family, prefix_len)


def _reference_scores(model, prompts, answers):
    """(N, L) sequence and constrained label log-probabilities from the model's own full forward."""
    seq, con = torch.zeros(len(prompts), len(answers)), torch.zeros(len(prompts), len(answers))
    for i, p in enumerate(prompts):
        for j, a in enumerate(answers):
            logits = model(input_ids=torch.tensor([p + a[:-1]])).logits[0, len(p) - 1:].float()  # (A, V)
            seq[i, j] = torch.log_softmax(logits, -1)[torch.arange(len(a)), a].sum()
            for k, token in enumerate(a):
                # Constrained decoding chooses only among the labels' next tokens after the same prefix.
                allowed = sorted({b[k] for b in answers if len(b) > k and b[:k] == a[:k]})
                if len(allowed) > 1:
                    con[i, j] += torch.log_softmax(logits[k, allowed], -1)[allowed.index(token)]
    return seq, con


def _check_label_scores(model, tok) -> None:
    fmt, enc = _encoded(tok)
    prompts = [e.ids[:e.n_prompt] for e in enc]
    answers = [encode_answer(tok, fmt, lab) for lab in LABELS]
    seq, con = _reference_scores(model, prompts, answers)
    assert torch.allclose(score_labels(model, prompts, answers, tok.pad_token_id, batch_size=4), seq, atol=1e-4)
    got = score_labels_constrained(model, prompts, answers, tok.pad_token_id, batch_size=4)
    assert torch.allclose(got, con, atol=1e-4)
    assert torch.allclose(con.exp().sum(-1), torch.ones(len(prompts)), atol=1e-4)


@contextmanager
def _window(model, size):
    """The model's sliding window set to `size` for the duration (the masks read it at each forward)."""
    old = model.config.sliding_window
    model.config.sliding_window = size
    try:
        yield
    finally:
        model.config.sliding_window = old


@torch.no_grad()
def test_label_scores_equal_model_forward(family_model):
    """Sequence and constrained label scores, with windows (where the family has one) longer than the
    prompts, as for real checkpoints on short prompts (Gemma 2: 4096, Gemma 3: 512 or more)."""
    _, model, tok = family_model
    with _window(model, 512) if getattr(model.config, "sliding_window", None) else nullcontext():
        _check_label_scores(model, tok)


@pytest.mark.xfail(strict=True, reason="known limit: batched label scoring left-pads prompts, and transformers "
                   "applies sliding windows by cache index, not position, so padded rows see fewer real tokens")
@torch.no_grad()
def test_label_scores_with_window_shorter_than_prompt(family_model):
    family, model, tok = family_model
    if not getattr(model.config, "sliding_window", None):
        pytest.skip(f"{family} has no sliding window")
    _check_label_scores(model, tok)


def _lora_model(model):
    """LoRA with tunesmith's defaults (all linear layers), B matrices randomised so it changes the outputs."""
    peft_model = lora.apply(copy.deepcopy(model), SimpleNamespace(lora=LoraConfig(dropout=0.0)))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return peft_model.eval()


def test_lora_targets_every_decoder_layer(family_model):
    from peft.tuners.lora import LoraLayer

    family, model, _ = family_model
    peft_model = _lora_model(model)
    names = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    for layer in range(model.config.num_hidden_layers):
        inside = [n for n in names if re.search(rf"\.layers\.{layer}\.", n)]
        assert any(".self_attn." in n for n in inside) and any(".mlp." in n for n in inside), (family, inside)
    assert not any("lm_head" in n for n in names)


@torch.no_grad()
def test_merged_model_equals_lora_model(family_model):
    """Merging is exact arithmetic, so it is checked in float64, where rounding cannot hide a wrong merge
    nor fail a right one: in float32 the merged and unmerged logits of these deliberately large updates
    differ by rounding alone, close to any fixed tolerance (peft 0.22 also adapts qwen2_moe's fused
    experts and router, and its float32 gap reached 1e-4 in one test order). MoE experts run eagerly
    there, as torch's grouped matmul takes no float64. Padding is attended like any token (both models
    see the same rows): in float64 a padded query outside a sliding window attends to nothing, and its
    NaN reaches every later position through the next layer's zero attention weights."""
    family, model, tok = family_model
    _, enc = _encoded(tok)
    batch = collate(enc, tok.pad_token_id)
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    peft_model = _lora_model(model).double()
    if getattr(model.config, "num_experts", 0):
        peft_model.get_base_model().set_experts_implementation("eager")
    merged = plain_lm(peft_model)
    assert not hasattr(merged, "peft_config")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    lora_logits = peft_model(**inputs).logits                                      # (B, T, V)
    with peft_model.disable_adapter():
        assert (lora_logits - peft_model(**inputs).logits).abs().max() > 1e-2  # the adapter changes the model
    assert (merged(**inputs).logits - lora_logits).abs().max() < 1e-9, family
    assert abs(supervised_loss(peft_model, batch)[0].item() - supervised_loss(merged, batch)[0].item()) < 1e-9
    # In float32, as the merged variant is built and parity-checked (optimize.parity.max_logit_diff 1e-3):
    # rounding only, far below that tolerance, router top-k choices of the MoE family included.
    fp32 = _lora_model(model)
    with torch.no_grad():
        gap = (plain_lm(fp32)(**inputs).logits - fp32(**inputs).logits).abs().max().item()
    assert gap < 1e-3, (family, gap)


@torch.no_grad()
def test_bf16_frozen_weights_change_only_the_embedding_rounding(family_model):
    """Training's compaction (frozen linear weights and input embedding in bf16, train/precision.py)
    gives under autocast the loss of the fp32 model with its embedding rounded to bf16, in every family
    (fused projections and MoE experts included; Gemma's scaled embedding stays fp32), and restores exactly."""
    from pathlib import Path

    from tunesmith import hardware
    from tunesmith.train.precision import compact_frozen, restore_frozen

    family, model, tok = family_model
    batch = collate(_encoded(tok)[1], tok.pad_token_id)
    plain = _lora_model(model)
    compact, trained = copy.deepcopy(plain), copy.deepcopy(plain)
    done = compact_frozen(compact, Path(model.name_or_path))
    cast = compact.get_input_embeddings().weight.dtype == torch.bfloat16
    assert done.names and cast == (not family.startswith("gemma")), family  # Gemma's scaled lookup stays fp32
    if cast:
        rounded = plain.get_input_embeddings().weight
        rounded.data = rounded.data.to(torch.bfloat16).float()
    with hardware.autocast(True, torch.device("cpu")):
        expected, got = supervised_loss(plain, batch)[0].item(), supervised_loss(compact, batch)[0].item()
    assert expected == got, (family, expected, got)
    restore_frozen(compact, done, Path(model.name_or_path))
    for (name, a), (_, b) in zip(trained.state_dict().items(), compact.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), (family, name)


def test_catalog_marks_tested_families():
    """Every family the catalog calls tested has parity tests here; every entry names its family."""
    assert set(TESTED_FAMILIES) == set(FAMILIES)
    assert all(e.family for e in CATALOG.values())
    tested = sorted(e.name for e in CATALOG.values() if e.tested)
    untested = sorted(e.name for e in CATALOG.values() if not e.tested)
    print(f"catalog entries of a tested family: {', '.join(tested)}; untested: {', '.join(untested) or 'none'}")
    assert all((e.family in TESTED_FAMILIES) == e.tested for e in CATALOG.values())
