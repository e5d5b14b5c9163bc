"""The LM head, applied the way the model's own forward applies it.

Training and constrained scoring run the decoder and the head separately (the head on the few
positions that matter), so whatever a family's forward does after the head has to happen here too:
Gemma 2 soft-caps its final logits (tanh(logits / cap) * cap). Every place that applies the head
itself goes through `head_logits`.
"""

from __future__ import annotations

import torch


def logit_softcap(config) -> float | None:
    """The family's final-logit soft cap (`final_logit_softcapping`), or None where it has none."""
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def head_logits(head, hidden: torch.Tensor, cap: float | None = None, rows=None) -> torch.Tensor:
    """Logits from final hidden states, as the model's forward computes them.

    Args:
        head: the output head module (called as is, so adapters on it count) or its (V, H) weight.
        hidden: (..., H) final hidden states.
        cap: the final-logit soft cap (see `logit_softcap`), or None.
        rows: vocabulary rows to compute (k,), or None for the whole vocabulary. A subset is
            computed in float32 from the weight alone.

    Returns:
        (..., V) logits, or (..., k) for `rows`.
    """
    if rows is None:
        logits = head(hidden) if callable(head) else hidden @ head.T               # (..., V)
    else:
        weight = head if isinstance(head, torch.Tensor) else head.weight            # (V, H)
        logits = hidden.float() @ weight[rows].float().T                           # (..., k)
    if cap is None:
        return logits
    # Soft-capping is elementwise, so capping a subset of rows equals capping all and selecting.
    return torch.tanh(logits / cap) * cap


def lm_logits(lm, hidden: torch.Tensor, rows=None) -> torch.Tensor:
    """`head_logits` with a transformers causal LM's own head and soft cap (`lm` unwrapped of PEFT)."""
    return head_logits(lm.get_output_embeddings(), hidden, logit_softcap(lm.config), rows)
