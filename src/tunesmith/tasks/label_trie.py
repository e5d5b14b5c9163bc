"""Constrained label scoring: the probability that decoding restricted to the label set produces
each label, computed only where the labels branch.

Label token sequences form a trie. Where a node has one child, constrained decoding has no choice,
so the node contributes a factor of 1; where it branches, the choice is a softmax over the logits of
the allowed next tokens. A label's probability is the product over the branching nodes on its path,
and the label probabilities sum to one. Only the tokens leading to branching nodes are run through
the model, and the LM head is applied to the allowed tokens' rows only: for BANKING77's 77 labels
(558 label tokens) that is 47 token positions per example instead of 1,309.

Labels sharing a first token form a group, and a label's probability is at most its group's
(the root's softmax). Pruned scoring expands a group only while its probability exceeds the best
label probability found so far (the most probable group first), which keeps the argmax and the
winner's probability exact and skips most of the tree for a confident model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from tunesmith.models.head import head_logits


@dataclass
class LabelTrie:
    """Branching nodes of the label trie and the token tree the model runs over.

    The tree holds every label prefix that leads to a branching node; each of its nodes is one token
    whose attention covers the prompt and the node's ancestors, so one forward per batch of prompts
    computes all of them (a tree attention mask), with no copy of the prompt's key/value cache.
    """

    nodes: list[tuple[int, ...]]          # branching prefixes, root () first when it branches
    children: list[list[int]]             # allowed next tokens at each branching node
    tree: list[tuple[int, ...]]           # prefixes run through the model, parents before children
    where: list[int]                      # per branching node: tree index whose hidden state predicts it; root -1
    choice: torch.Tensor                  # (L, C) 1 where label l takes child c (C = all nodes' children, concatenated)
    group_of: list[int]                   # per label: its group, the root child it starts with
                                          # (0 if the root does not branch)
    group_nodes: list[list[int]]          # per group: the tree indices under it (empty for a group of one label)

    @classmethod
    def build(cls, answers: list[list[int]]) -> LabelTrie:
        kids: dict[tuple, set] = defaultdict(set)
        for a in answers:
            for k in range(len(a)):
                kids[tuple(a[:k])].add(a[k])
        nodes = sorted((p for p, c in kids.items() if len(c) >= 2), key=lambda p: (len(p), p))
        children = [sorted(kids[p]) for p in nodes]
        tree = sorted({p[:k] for p in nodes for k in range(1, len(p) + 1)}, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(tree)}
        where = [index[p] if p else -1 for p in nodes]
        offsets = [0]
        for c in children:
            offsets.append(offsets[-1] + len(c))
        choice = torch.zeros(len(answers), offsets[-1])
        node_index = {p: i for i, p in enumerate(nodes)}
        for lab, a in enumerate(answers):
            for k in range(len(a)):
                i = node_index.get(tuple(a[:k]))
                if i is not None:
                    choice[lab, offsets[i] + children[i].index(a[k])] = 1.0
        root = children[0] if nodes and nodes[0] == () else None
        group_of = [root.index(a[0]) if root else 0 for a in answers]
        group_nodes = [[i for i, p in enumerate(tree) if p[0] == t] for t in root] if root else [list(range(len(tree)))]
        return cls(nodes, children, tree, where, choice, group_of, group_nodes)

    def root_branches(self) -> bool:
        return bool(self.nodes) and self.nodes[0] == ()

    def positions(self) -> int:
        """Token positions run per example beyond the prompt."""
        return len(self.tree)

    def tree_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tree_inputs(self.tree)


def tree_inputs(prefixes: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A token tree of label prefixes: (Q,) token ids, (Q,) depths (1 = first label token) and the
    (Q, Q) ancestor-or-self mask (node p sees node q when q is a prefix of p)."""
    ids = torch.tensor([p[-1] for p in prefixes], dtype=torch.long)
    depth = torch.tensor([len(p) for p in prefixes], dtype=torch.long)
    sees = torch.tensor([[q == p[:len(q)] for q in prefixes] for p in prefixes],
                        dtype=torch.bool).reshape(len(prefixes), len(prefixes))
    return ids, depth, sees


def node_log_probs(hidden_last: torch.Tensor, tree_hidden: torch.Tensor | None, trie: LabelTrie,
                   head) -> torch.Tensor:
    """(B, C) log-probabilities of each node's allowed tokens, softmax within each node.

    Args:
        hidden_last: (B, H) final hidden state of each prompt (predicts the root's children).
        tree_hidden: (B, Q, H) hidden states of the tree tokens, or None when only the root branches.
        head: (V, H) the LM head's weight (rows of allowed tokens are used), or a function
            `head(h, rows=kids)` giving the (B, k) logits of those rows (see models/head.py `lm_logits`).
    """
    parts = []
    for q, kids in zip(trie.where, trie.children):
        h = hidden_last if q < 0 else tree_hidden[:, q]                       # (B, H)
        logits = head(h, rows=kids) if callable(head) else head_logits(head, h, rows=kids)  # (B, k)
        parts.append(torch.log_softmax(logits, dim=-1))
    return torch.cat(parts, dim=-1) if parts else hidden_last.new_zeros((hidden_last.shape[0], 0))
