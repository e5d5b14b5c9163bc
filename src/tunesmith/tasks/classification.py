"""Classification with a causal LM: score every label after the prompt, pick the best.

The prompt is run once per example; its KV cache is shared by all candidate labels, so a
77-label task costs one prompt forward plus one short forward over the label tokens.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tunesmith import cores
from tunesmith.models.head import lm_logits
from tunesmith.models.tokens import left_pad
from tunesmith.tasks.cache import (
    broadcast,
    cache_kwargs,
    cache_len,
    cache_tensors,
    common_prefix_len,
    continue_after,
    full_cache,
    output_cache,
    prefix_tensors,
    select_rows,
    unwrap,
)
from tunesmith.tasks.label_trie import LabelTrie, node_log_probs

# (example, label) rows x cached prompt tokens per continuation forward. Every row carries its own copy
# of its prompt's keys and values for every layer, and the forward concatenates them once more
# (SmolLM2-135M in fp32: 46 KB per cached token), so 64 rows of 135-token prompts took 0.8 GB.
CONTINUATION_CACHE_TOKENS = 2048


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.inference_mode()
def score_labels(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                 batch_size: int = 16, max_rows: int = 64, progress: str | None = None) -> torch.Tensor:
    """Log-probability of each answer's tokens after each prompt.

    Args:
        model: a causal LM (plain or PEFT-wrapped).
        prompts: token ids per example.
        answers: token ids per label (the label text and its end-of-turn marker).
        pad_id: padding token id.
        batch_size: prompts per forward.
        max_rows: (example, label) rows per candidate forward, to bound memory.
        progress: label of a progress bar over the examples, or None for no bar.

    Returns:
        (N, L) float32 tensor of summed log-probabilities.
    """
    dev = next(model.parameters()).device
    label_ids, label_mask = (t.to(dev) for t in right_pad(answers, pad_id))  # (L, A)
    n_prefix = common_prefix_len(prompts)
    prefix = prefix_tensors(model, torch.tensor(prompts[0][:n_prefix], device=dev))
    # Past the prefix the base model runs as is (prompt-learning wrappers would add their tokens twice).
    model = unwrap(model)
    scores = []
    with tqdm(total=len(prompts), desc=progress, unit="ex", disable=progress is None, dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), batch_size):
            cores.fit_threads(dev)  # beside a busy process, fewer threads than cores (cores.py)
            batch = [p[n_prefix:] for p in prompts[start:start + batch_size]]
            scores.append(_score_batch(model, prefix, batch, label_ids, label_mask, pad_id, max_rows))
            bar.update(len(batch))
    return torch.cat(scores).cpu()


def _score_batch(model, prefix, prompts, label_ids, label_mask, pad_id, max_rows) -> torch.Tensor:
    dev = label_ids.device
    ids, mask = (t.to(dev) for t in left_pad(prompts, pad_id))  # (B, S): prompt tails after the shared prefix
    mask, positions = continue_after(cache_len(prefix), mask)  # (B, P+S), (B, S)
    extra = cache_kwargs(model, broadcast(prefix, len(prompts)) if prefix else full_cache())
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **extra)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V)
    scores = first[:, label_ids[:, 0]]  # (B, L): log p(first answer token | prompt)
    if label_ids.shape[1] == 1:
        return scores
    tensors = cache_tensors(output_cache(out))
    n_b, n_l = scores.shape
    pairs = torch.cartesian_prod(torch.arange(n_b, device=dev), torch.arange(n_l, device=dev))  # (B*L, 2)
    rest = torch.zeros(n_b * n_l, device=dev)
    step = continuation_rows(max_rows, mask.shape[1])
    for start in range(0, len(pairs), step):
        chunk = pairs[start:start + step]
        rest[start:start + len(chunk)] = _score_continuations(model, tensors, chunk, mask, label_ids, label_mask)
    return scores + rest.view(n_b, n_l)


def continuation_rows(max_rows: int, cached_tokens: int) -> int:
    """Rows per continuation forward: at most `max_rows`, and within CONTINUATION_CACHE_TOKENS of cached
    prompt tokens (at least one row, however long its prompt)."""
    return max(1, min(max_rows, CONTINUATION_CACHE_TOKENS // max(cached_tokens, 1)))


def _score_continuations(model, tensors, pairs, prompt_mask, label_ids, label_mask) -> torch.Tensor:
    """Log p(answer tokens 2..A | prompt, answer token 1) for (example, label) pairs."""
    b_idx, l_idx = pairs[:, 0], pairs[:, 1]
    inputs = label_ids[l_idx, :-1]                      # (R, A-1)
    targets = label_ids[l_idx, 1:]                      # (R, A-1)
    target_mask = label_mask[l_idx, 1:].float()         # (R, A-1)
    attention = torch.cat([prompt_mask[b_idx], label_mask[l_idx, :-1]], dim=1)  # (R, T+A-1)
    start = prompt_mask[b_idx].sum(-1, keepdim=True)    # (R, 1) real prompt length
    positions = start + torch.arange(inputs.shape[1], device=inputs.device)   # (R, A-1)
    cache = select_rows(tensors, b_idx)
    out = model(input_ids=inputs, attention_mask=attention, position_ids=positions, use_cache=True,
                **cache_kwargs(model, cache))
    logp = torch.log_softmax(out.logits.float(), dim=-1)  # (R, A-1, V)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (R, A-1)
    return (picked * target_mask).sum(-1)


@torch.inference_mode()
def score_labels_constrained(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                             batch_size: int = 16, progress: str | None = None, prune: bool = False) -> torch.Tensor:
    """Log-probability of each label under decoding constrained to the label set (see label_trie).

    Same arguments and (N, L) result as score_labels; each row's probabilities sum to one. With
    `prune`, label groups that cannot beat the best label are not run; their labels share the group's
    probability evenly (each below the winner's), so the argmax and the winner's score stay exact.
    """
    dev = next(model.parameters()).device
    trie = LabelTrie.build(answers)
    tree = tuple(t.to(dev) for t in trie.tree_inputs())
    n_prefix = common_prefix_len(prompts)
    prefix = prefix_tensors(model, torch.tensor(prompts[0][:n_prefix], device=dev))
    decoder = unwrap(model).get_decoder()
    head = partial(lm_logits, unwrap(model))                        # (..., H), rows -> (..., k) logits
    scores = []
    with tqdm(total=len(prompts), desc=progress, unit="ex", disable=progress is None, dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), batch_size):
            cores.fit_threads(dev)
            batch = [p[n_prefix:] for p in prompts[start:start + batch_size]]
            mask, last, tensors = _prompt_forward(decoder, prefix, batch, pad_id)
            expand = partial(_tree_forward, decoder, tensors, mask, tree)
            scores.append(_expand_groups(trie, head, last, expand, prune))
            bar.update(len(batch))
    return torch.cat(scores).cpu()


def _prompt_forward(decoder, prefix, prompts, pad_id):
    """Attention mask (B, P+S), last prompt hidden states (B, H) and the per-layer KV tensors."""
    dev = decoder.get_input_embeddings().weight.device
    ids, mask = (t.to(dev) for t in left_pad(prompts, pad_id))   # (B, S)
    mask, positions = continue_after(cache_len(prefix), mask)       # (B, P+S), (B, S)
    extra = cache_kwargs(decoder, broadcast(prefix, len(prompts)) if prefix else full_cache())
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    return mask, out.last_hidden_state[:, -1], cache_tensors(output_cache(out))


def _expand_groups(trie: LabelTrie, head, last, expand, prune: bool) -> torch.Tensor:
    """(B, L) constrained label scores, running the tree nodes of the groups that need it.

    `expand(rows, idx)` returns the (R, Q', H) hidden states of tree nodes idx (R, Q'; -1 = none)
    after the prompts of batch rows `rows`.
    """
    dev, n_b = last.device, last.shape[0]
    hidden = last.new_zeros((n_b, trie.positions(), last.shape[-1]))                # (B, Q, H)
    group = torch.tensor(trie.group_of, device=dev)                                # (L,)
    members = torch.bincount(group, minlength=len(trie.group_nodes)).float()       # (G,)
    empty = torch.tensor([not g for g in trie.group_nodes], device=dev)
    done = empty.expand(n_b, -1).clone()                                           # (B, G) groups scored exactly
    choice = trie.choice.to(dev)                                                   # (L, C)
    scores, group_lp = _label_scores(trie, head, last, hidden, choice)
    want = F.one_hot(group_lp.argmax(-1), len(members)).bool() if prune else torch.ones_like(done)
    want &= ~done
    while want.any():
        rows = want.any(-1).nonzero().squeeze(-1)                                  # (R,)
        idx = _pad_nodes([[i for g in want[r].nonzero().squeeze(-1).tolist() for i in trie.group_nodes[g]]
                          for r in rows.tolist()], dev)                              # (R, Q')
        states = expand(rows, idx)                                                  # (R, Q', H)
        valid = idx >= 0
        hidden[rows[:, None].expand_as(idx)[valid], idx[valid]] = states[valid].to(hidden.dtype)
        done |= want
        scores, group_lp = _label_scores(trie, head, last, hidden, choice)
        best = scores.masked_fill(~done[:, group], float("-inf")).amax(-1, keepdim=True)  # (B, 1)
        want = ~done & (group_lp > best)
    return torch.where(done[:, group], scores, group_lp[:, group] - members[group].log())


def _label_scores(trie, head, last, hidden, choice):
    """(B, L) label scores from the tree states computed so far, and (B, G) group log-probabilities."""
    nodes = node_log_probs(last, hidden, trie, head)                               # (B, C)
    n_groups = len(trie.group_nodes)
    group_lp = nodes[:, :n_groups] if trie.root_branches() else nodes.new_zeros((len(nodes), 1))
    return nodes @ choice.T, group_lp


def _pad_nodes(lists: list[list[int]], dev) -> torch.Tensor:
    width = max(len(x) for x in lists)
    return torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long, device=dev)


def _tree_forward(decoder, tensors, mask, tree, rows, idx):
    """(R, Q', H) hidden states of tree nodes idx (R, Q'; -1 = padding) after the prompts of `rows`.

    A 4D mask lets each node see its prompt's real tokens and its own ancestors only (padding sees
    itself); its position is the prompt length plus its depth.
    """
    tree_ids, depth, sees = tree                                     # (Q,), (Q,), (Q, Q)
    safe, valid = idx.clamp(min=0), idx >= 0                         # (R, Q')
    width = idx.shape[1]
    prompt = mask[rows].bool()                                       # (R, KV)
    among = sees[safe[:, :, None], safe[:, None, :]] & valid[:, None, :]          # (R, Q', Q')
    among |= torch.eye(width, dtype=torch.bool, device=idx.device)
    full = torch.cat([prompt[:, None, :].expand(-1, width, -1), among], dim=2)    # (R, Q', KV+Q')
    pos = prompt.sum(-1, keepdim=True) + depth[safe] - 1                           # (R, Q')
    step = decoder(input_ids=tree_ids[safe], attention_mask=_attention_4d(decoder, full[:, None]),
                   position_ids=pos, use_cache=True, **cache_kwargs(decoder, select_rows(tensors, rows)))
    return step.last_hidden_state


def _attention_4d(decoder, allowed: torch.Tensor) -> torch.Tensor:
    """A (B, 1, Q, KV) mask in the form the attention implementation takes: boolean for SDPA and
    flex, additive float (0 / dtype min) for eager."""
    if getattr(decoder.config, "_attn_implementation", "sdpa") == "eager":
        dtype = decoder.get_input_embeddings().weight.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                         torch.finfo(dtype).min)
    return allowed


def predict_labels(scores: torch.Tensor, labels: list[str]) -> tuple[list[str], list[dict[str, float]]]:
    """Argmax label per row, and probabilities normalised over the label set."""
    probs = torch.softmax(scores, dim=-1)
    best = scores.argmax(-1).tolist()
    predictions = [labels[i] for i in best]
    probabilities = [{lab: round(float(p), 6) for lab, p in zip(labels, row)} for row in probs]
    return predictions, probabilities
