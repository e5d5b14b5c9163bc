"""Frozen weights in bf16 while training under bf16 autocast.

Under autocast every linear layer casts its fp32 weight to bf16 before the matmul, so storing the
frozen ones in bf16 changes no linear layer's result: it only drops the fp32 copy (and autocast's
bf16 copy, made anew at each call for a frozen weight and kept for backward) of most of a model's
parameters. A frozen nn.Embedding input embedding is stored in bf16 too (SmolLM2-135M: 57 MB saved, and the
tied LM head then needs no per-step bf16 copy either); its lookups are cast back to fp32, so the
residual stream keeps its precision and the only change is each input embedding rounded to bf16
(relative error at most 2**-9). After training the fp32 values are read back from the checkpoint, so
the returned model is exactly the model that was loaded plus what trained.

transformers maps a safetensors checkpoint into memory and uses it in place, so a cast alone frees
nothing: the fp32 file pages it read stay resident while any weight still points into the mapping
(SmolLM2-135M: 513 MB). The weights kept in fp32 therefore get memory of their own, which releases
the mapping: the fp32 copy of the cast weights is gone before training allocates anything.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.registry import METHOD_SPECS
from tunesmith.tasks.cache import unwrap


@dataclass
class Compacted:
    """What `compact_frozen` changed, for `restore_frozen` to undo."""

    names: list[str] = field(default_factory=list)  # modules whose frozen weight is bf16 now
    hooks: list = field(default_factory=list)  # forward-hook handles to remove


@contextmanager
def frozen_in_bf16(model, cfg, bf16: bool, checkpoint: Path, compiled: bool = False) -> Iterator[Compacted]:
    """`compact_for_training` for the block; on leaving it, normally or by an exception (an error, Ctrl-C,
    a pruned search trial), the fp32 weights come back (`restore_frozen`), so the caller's model is never
    left with bf16 frozen weights."""
    done = compact_for_training(model, cfg, bf16, checkpoint, compiled)
    try:
        yield done
    except BaseException as stopped:
        # The original exception is what the caller acts on (Ctrl-C keeps a resumable run, a pruned
        # trial is skipped): a failed restore is noted on it, never raised instead of it.
        try:
            restore_frozen(model, done, checkpoint)
        except Exception as failed:  # noqa: BLE001 - reported on the exception that stopped training
            stopped.add_note(f"restoring the fp32 frozen weights failed too: {failed}")
        raise
    restore_frozen(model, done, checkpoint)


def compact_for_training(model, cfg, bf16: bool, checkpoint: Path, compiled: bool = False) -> Compacted:
    """`compact_frozen` where it changes no result and can be undone: under bf16 autocast (`bf16`), for a
    method whose frozen weights may be bf16 (registry.MethodSpec.low_precision_frozen; for a preference
    method also the adapter it trains, train.preference.adapter), on a model loaded from a safetensors
    checkpoint (`checkpoint`) that `restore_frozen` reads the fp32 weights back from. `cfg`: a TrainConfig.
    `compiled`: whether the layers will run through torch.compile (not whether train.compile is set:
    training may leave it off, e.g. under gradient checkpointing), which rules out `share_input_casts`."""
    methods = [cfg.method] + ([cfg.preference.adapter] if METHOD_SPECS[cfg.method].preference else [])
    if bf16 and all(METHOD_SPECS[m].low_precision_frozen for m in methods) and has_weights(checkpoint):
        done = compact_frozen(model, checkpoint)
        if done.names and not compiled:  # a compiled layer would trace the hook's weak references
            try:
                share_input_casts(model, done)
            except BaseException:  # the caller's try has not begun: leave its model in fp32 here
                restore_frozen(model, done, checkpoint)
                raise
        return done
    return Compacted()


def has_weights(folder: Path) -> bool:
    """Whether `folder` is a checkpoint folder with safetensors weights."""
    return folder.is_dir() and any(folder.glob("*.safetensors"))


def compact_frozen(model, checkpoint: Path) -> Compacted:
    """Cast frozen nn.Linear weights and a frozen nn.Embedding input embedding to bf16.

    Only weights that `checkpoint`'s safetensors files hold are cast (`restore_frozen` reads them
    back from there); the embedding's lookups are cast back to fp32 by a forward hook."""
    lm = unwrap(model)
    stored = _checkpoint_keys(checkpoint)
    embedding = lm.get_input_embeddings()
    table, plain = getattr(embedding, "weight", None), _plain_lookup(embedding)
    was_fp32 = table is not None and table.dtype == torch.float32
    done = Compacted()
    for name, module in lm.named_modules():
        weight = getattr(module, "weight", None)
        # A head tied to an embedding that must stay fp32 is that embedding: not cast either.
        castable = (isinstance(module, torch.nn.Linear) and (weight is not table or plain)
                    or module is embedding and plain)
        if (castable and isinstance(weight, torch.Tensor) and not weight.requires_grad
                and weight.dtype == torch.float32 and _key(name) in stored):
            module.weight.data = weight.data.to(torch.bfloat16)
            done.names.append(name)
    if done.names:
        # Cast through its own name or as the LM head it is tied to (one Parameter either way).
        if plain and was_fp32 and embedding.weight.dtype == torch.bfloat16:
            done.hooks.append(embedding.register_forward_hook(_as_fp32))
        _own_memory(lm)
    return done


def _plain_lookup(module) -> bool:
    """A torch nn.Embedding itself: subclasses (Gemma's scaled embeddings) compute in the weight's dtype
    after the lookup, which a bf16 weight would round a second time."""
    return type(module) is torch.nn.Embedding


def _as_fp32(module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()  # (B, T, H): the residual stream starts in fp32, as with an fp32 embedding


def _key(module_name: str) -> str:
    """The checkpoint key of a module's weight (inside PEFT wrappers the layer sits at <name>.base_layer)."""
    return module_name.replace(".base_layer", "") + ".weight"


def _checkpoint_keys(checkpoint: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys.update(f.keys())
    return keys


def _own_memory(lm) -> None:
    """Copy the frozen fp32 parameters and the buffers into memory of their own, so no tensor points
    into the checkpoint's file mapping any more and the mapping (with every page read) is released.
    Trainable parameters are new tensors already; a tied weight is one Parameter, copied once."""
    for p in lm.parameters():  # each shared Parameter once
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.clone()
    for module in lm.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.clone()


def restore_frozen(model, compacted: Compacted, checkpoint: Path) -> None:
    """Undo `compact_frozen`: put back the fp32 weights from the checkpoint, then remove its hooks (last,
    so a restore that fails part way leaves bf16 lookups still cast to fp32)."""
    if not compacted.names:
        _remove(compacted.hooks)
        return
    from safetensors import safe_open

    lm = unwrap(model)
    modules = dict(lm.named_modules())
    wanted = {_key(name): name for name in compacted.names}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in set(f.keys()) & set(wanted):
                module = modules[wanted.pop(key)]
                module.weight.data = f.get_tensor(key).to(module.weight.device, torch.float32)
    if wanted:
        raise RuntimeError(f"fp32 weights not found in {checkpoint}: {sorted(wanted)[:3]}")
    _remove(compacted.hooks)


def _remove(hooks: list) -> None:
    for handle in hooks:
        handle.remove()


def share_input_casts(model, done: Compacted) -> None:
    """One bf16 copy of an input that several LoRA adapters read in turn, instead of one each.

    Under autocast each adapter's A matrix casts its fp32 input to bf16 and keeps that copy for
    backward, so the adapters of q, k and v (which read the same normed hidden states) keep three
    copies, gate and up two. Here a pre-hook on each A matrix (`_SharedCast`) casts an fp32 input once
    and hands each adapter an alias of that one copy (`_CastAlias`), whose backward returns the
    gradient in fp32 as autocast's own cast does: the same matmuls on the same values, each adapter's
    gradient summed in fp32 as before, so the results are unchanged (test); fewer copies are kept.
    Only plain LoRA layers without dropout (an Identity) whose frozen weight `compact_frozen` made bf16:
    DoRA and dropout compute on the input in its own precision. Undone by `restore_frozen`.

    PEFT casts a layer's input to its A matrix's dtype first, so a bf16 input (o_proj's, down_proj's)
    became a fresh fp32 tensor that autocast then cast back to bf16: two copies for nothing, as the
    round trip bf16 -> fp32 -> bf16 is exact. On these layers that cast is off while sharing, so a bf16
    input reaches the A matrix as it is (the same values, and its gradient the same bf16 one)."""
    from peft.tuners.lora import Linear as LoraLinear

    cast = _SharedCast()
    compacted = set(done.names)
    for name, module in unwrap(model).named_modules():
        if (isinstance(module, LoraLinear) and f"{name}.base_layer" in compacted and not module.lora_variant
                and all(isinstance(d, torch.nn.Identity) for d in module.lora_dropout.values())):
            done.hooks += [a.register_forward_pre_hook(cast) for a in module.lora_A.values()]
            done.hooks.append(_InputCastOff(module))


class _InputCastOff:
    """Turns PEFT's input cast off on a LoRA layer until `remove` (a handle like a hook's)."""

    def __init__(self, layer):
        self.layer, self.was = layer, getattr(layer, "cast_input_dtype_enabled", True)
        layer.cast_input_dtype_enabled = False

    def remove(self) -> None:
        self.layer.cast_input_dtype_enabled = self.was


class _CastAlias(torch.autograd.Function):
    """`x` as its bf16 copy `cast` (computed once, outside autograd): the output shares `cast`'s memory,
    and the gradient goes back to `x` in x's dtype, as autocast's cast would send it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


class _SharedCast:
    """Forward pre-hook: under bf16 autocast with gradients on, an fp32 input as an alias of one bf16
    cast, made once for consecutive layers given the same tensor (the same object, not changed in
    place since). Weak references only: a cast nothing keeps for backward is not kept alive here."""

    def __init__(self):
        self.source, self.cast, self.version = None, None, -1

    def __call__(self, module, args: tuple):
        x = args[0] if args else None
        # Without gradients nothing is kept for backward, so there is nothing to share (and an inference
        # tensor has no version counter).
        if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.dtype == torch.float32
                and not x.is_inference() and _bf16_autocast(x.device.type)):
            return None
        cast = self.cast() if self.cast is not None else None
        if cast is None or self.source() is not x or x._version != self.version:
            cast = x.detach().to(torch.bfloat16)
            self.source, self.cast, self.version = weakref.ref(x), weakref.ref(cast), x._version
        return (_CastAlias.apply(x, cast), *args[1:])


def _bf16_autocast(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


def make_optimizer(params: list[torch.Tensor], cfg) -> torch.optim.Optimizer:
    """AdamW over `params` as `cfg.optimizer` (a TrainConfig) asks: torch's (fp32 state), or bitsandbytes'
    with 8-bit state ("adamw_8bit"; "paged_adamw_8bit" also pages that state out of GPU memory, and on
    a CPU bitsandbytes runs it unpaged)."""
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        from tunesmith.errors import InputError

        raise InputError(f"train.optimizer={cfg.optimizer} needs the bitsandbytes package", "train.optimizer",
                         "pip install bitsandbytes, or set train.optimizer to adamw") from None
    paged = cfg.optimizer == "paged_adamw_8bit"
    return (bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit)(params, **kwargs)
