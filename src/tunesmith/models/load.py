"""Load a resolved checkpoint for training or inference (safetensors, no remote code)."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.errors import ModelError


def load_tokenizer(path: Path):
    """The tokenizer of a local model folder, padding with its EOS token when it has no pad token.

    Raises:
        ModelError: one with neither token (a folder holding tokenizer.json without its
            tokenizer_config.json loads as one): every batch pads and every answer stops on them.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as e:  # a config.json that is not JSON, no tokenizer files: the folder, not tunesmith
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the tokenizer from {path}: {reason}", "model",
                         "it needs a readable config.json and its tokenizer files (tokenizer.json or "
                         "tokenizer.model with tokenizer_config.json)") from None
    _check_chat_template(tokenizer, Path(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise ModelError(f"the tokenizer in {path} has no end-of-sequence or padding token", "model",
                         "is its tokenizer_config.json missing? restore the folder's tokenizer files")
    return tokenizer


def _check_chat_template(tokenizer, path: Path) -> None:
    """ModelError naming the template's file and line when the folder's chat template does not parse
    (met later, it was an internal error in the middle of an export or an eval)."""
    import jinja2

    # transformers' own compiler: its environment has the extensions templates use ({% break %},
    # {% generation %}), which a plain jinja2 Environment refuses
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = tokenizer.chat_template
    if not isinstance(template, str):  # none, or a dict of named templates (parsed where one is used)
        return
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as e:
        jinja_file = path / "chat_template.jinja"
        where = f"{jinja_file}:{e.lineno}" if jinja_file.is_file() else str(path / "tokenizer_config.json")
        raise ModelError(f"the chat template does not parse ({e.message})", where,
                         "restore the folder's chat template") from None


def load_model(path: Path, dtype: torch.dtype = torch.float32):
    """A causal LM from a local folder, in eval mode."""
    from transformers import AutoModelForCausalLM

    from tunesmith import hardware

    hardware.native_gqa(hardware.device())  # on a CPU: no repeated K/V heads kept for backward (see there)
    if not Path(path).is_dir():  # a base model folder gone since a run trained on it
        raise ModelError(f"the model folder {path} is not there", "model",
                         "restore the checkpoint folder, or train the run again")
    if not any(Path(path).glob("*.safetensors")):
        raise ModelError(f"no safetensors weights in {path}", "model",
                         "tunesmith loads safetensors only (pickle files can run code); convert the checkpoint")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=False,
                                                           use_safetensors=True, output_loading_info=True)
    except Exception as e:
        raise ModelError(f"cannot load model from {path}: {e}", "model",
                         "it must be a causal language model checkpoint") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers fills them with random values and goes on: a model that is partly noise
        raise ModelError(f"the checkpoint lacks {len(missing)} of the model's weights (first: "
                         f"{missing[0][:120]}); they would start random", str(path),
                         "restore the folder's safetensors files, or use a complete checkpoint")
    model.eval()
    return model


def context_length(model) -> int | None:
    """Positions the model can attend over (`max_position_embeddings`), None where its config does not
    say. A learned position table has no row past it; a rotary model past it was never trained there."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


def plain_lm(model):
    """A plain transformers model computing what `model` computes: PEFT weight adapters (LoRA, DoRA,
    IA3) merged into a copy, a plain model as is, None for soft prompts and prefixes (their trained
    part is not in the weights)."""
    import copy

    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return model
    if config.is_prompt_learning:
        return None
    return copy.deepcopy(model).merge_and_unload().eval()
