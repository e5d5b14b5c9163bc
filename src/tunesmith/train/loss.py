"""The training loss, computed once here: cross-entropy over supervised tokens only.

The LM head runs on the supervised positions alone; a (B, T, V) logits tensor over a 49k
vocabulary would cost more than the rest of a small model's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunesmith.models.head import lm_logits
from tunesmith.tasks.cache import broadcast, cache_kwargs, cache_len, continue_after, prefix_tensors, unwrap
from tunesmith.train.batching import IGNORE

# Supervised positions per head + cross-entropy chunk when a batch has more (see _chunked_loss).
CE_CHUNK = 1024


def supervised_loss(model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Mean token cross-entropy over positions whose label is not IGNORE.

    `label_smoothing` spreads that share of each target's probability mass over the vocabulary
    (training only; validation loss is always the plain cross-entropy).

    With `batch["weights"]` (B,), each row's tokens count with its weight (a weighted mean).

    Returns:
        (loss, number of supervised tokens). The mean is over tokens, not examples, so long
        answers weigh by their length, as in standard causal-LM training.
    """
    if _supervised_count(batch) > CE_CHUNK:
        return _chunked_loss(model, batch, label_smoothing)
    logits, targets = supervised_logits(model, batch)  # (N, V), (N,)
    n = len(targets)
    if "weights" not in batch:
        loss = F.cross_entropy(logits.float(), targets, reduction="sum", label_smoothing=label_smoothing) / max(n, 1)
        return loss, n
    ce = F.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=label_smoothing)  # (N,)
    return _weighted_mean(ce, batch), n


def _supervised_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _chunked_loss(model, batch: dict[str, torch.Tensor], label_smoothing: float) -> tuple[torch.Tensor, int]:
    """`supervised_loss` for many supervised tokens, through `supervised_token_ce`'s chunks: the same
    value and gradients without the (N, V) logits at once."""
    ce = supervised_token_ce(model, batch, label_smoothing)  # (N,)
    n = len(ce)
    return (ce.sum() / max(n, 1) if "weights" not in batch else _weighted_mean(ce, batch)), n


def supervised_token_ce(model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """(N,) cross-entropy of each supervised token, row after row in order, with gradients.

    Only the N supervised positions reach the head, and above CE_CHUNK of them the head and the
    cross-entropy run CE_CHUNK positions at a time under activation checkpointing, so the (N, V) logits
    never exist at once (4,096 answer tokens over a 150k vocabulary are 2.4 GB in fp32)."""
    lm = unwrap(model)
    h, targets = _supervised_states(model, batch)  # (N, H), (N,)
    if len(targets) <= CE_CHUNK:
        return _chunk_ce(lm, h, targets, label_smoothing)
    return torch.cat([checkpoint(_chunk_ce, lm, h[s:s + CE_CHUNK], targets[s:s + CE_CHUNK], label_smoothing,
                                 use_reentrant=False) for s in range(0, len(targets), CE_CHUNK)])  # (N,)


def _weighted_mean(ce: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Row weights (fairness reweighting): each supervised token's (N,) loss counts with its row's weight."""
    selected = batch["labels"][:, 1:] != IGNORE                                  # (B, T-1)
    w = batch["weights"][:, None].expand_as(selected)[selected].to(ce.device)    # (N,)
    return (ce * w).sum() / w.sum().clamp(min=1e-12)


def _chunk_ce(lm, h: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """(c,) token cross-entropy of one chunk of supervised positions."""
    return F.cross_entropy(lm_logits(lm, h).float(), targets, reduction="none", label_smoothing=label_smoothing)


def _supervised_states(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) final hidden states at the N supervised positions and their (N,) target tokens."""
    hidden = _hidden_states(model, batch)       # (B, T, H)
    targets = batch["labels"][:, 1:]            # (B, T-1): token t+1 is predicted at t
    selected = targets != IGNORE                # (B, T-1)
    return hidden[:, :-1][selected], targets[selected]


def supervised_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits at the N supervised positions and their (N,) target tokens."""
    h, targets = _supervised_states(model, batch)  # (N, H), (N,)
    return lm_logits(unwrap(model), h), targets     # the model's head and any final soft cap


def token_losses(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) plain cross-entropy of each supervised token, row after row in order (per-document sums for
    evaluation); the head runs CE_CHUNK positions at a time, as in `_chunked_loss`."""
    lm = unwrap(model)
    h, targets = _supervised_states(model, batch)  # (N, H), (N,)
    return torch.cat([_chunk_ce(lm, h[s:s + CE_CHUNK], targets[s:s + CE_CHUNK], 0.0)
                      for s in range(0, len(targets), CE_CHUNK)] or [h.new_zeros(0)])  # (N,); no checkpoint: eval


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Knowledge distillation: alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE.

    Args:
        student_logits: (N, C) logits of the student at N supervised positions (or examples).
        teacher_logits: (N, C) teacher logits at the same positions, over the same classes.
        targets: (N,) hard labels (class indices).
        temperature: softening of both distributions; T^2 keeps the soft term's gradient scale.
        alpha: weight of the soft (teacher) term.

    Returns:
        The scalar loss, a mean over the N positions.
    """
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)    # (N, C)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)    # (N, C)
    soft = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * t * t
    hard = F.cross_entropy(student_logits.float(), targets)
    return alpha * soft + (1 - alpha) * hard


def _hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (B, T, H) of the batch rows, after the shared prefix when there is one."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    decoder = unwrap(model).get_decoder()
    if "position_ids" in batch:  # packed rows (batching.collate_packed)
        return _packed_hidden_states(decoder, ids, batch["position_ids"])
    # Every supervised token lies after the prefix, so the prefix needs no hidden states of its own.
    prefix = prefix_tensors(model, batch.get("prefix_ids"))
    if prefix is None:
        return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    full_mask, positions = continue_after(cache_len(prefix), mask)
    return decoder(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                   **cache_kwargs(decoder, broadcast(prefix, ids.shape[0]))).last_hidden_state


def _packed_hidden_states(decoder, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, T, H) of packed rows whose (B, T) `positions` restart at every example.

    No attention mask goes in: transformers (5.x `masking_utils`) then takes each restart as an
    example boundary and builds a block-diagonal causal mask for eager, SDPA and flex attention.
    Flash-attention kernels read the restarts only from a single row (varlen), so there the rows
    are laid end to end as one (1, B*T) row.
    """
    if not _one_row(decoder):
        return decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    b, t = ids.shape
    flat = decoder(input_ids=ids.reshape(1, b * t), position_ids=positions.reshape(1, b * t),
                   use_cache=False).last_hidden_state  # (1, B*T, H)
    return flat.reshape(b, t, -1)


def _one_row(decoder) -> bool:
    """Whether the attention implementation sees packed examples only within one row (flash kernels)."""
    return "flash" in str(getattr(decoder.config, "_attn_implementation", "") or "")
