"""Label scoring with a shared KV cache, and the training loss with a shared prefix, must equal
the naive full-sequence computations."""

from __future__ import annotations

import pytest
import torch

from conftest import make_texts
from tunesmith.config import TaskConfig
from tunesmith.data.examples import Example
from tunesmith.models.load import load_model, load_tokenizer
from tunesmith.tasks.classification import score_labels
from tunesmith.tasks.predict import encode_prompts
from tunesmith.tasks.prompts import build_format, encode_answer
from tunesmith.train.batching import collate, encode_for_training
from tunesmith.train.loss import supervised_loss

LABELS = ["alpha", "beta", "gamma", "alpha beta gamma red"]  # answers of different token lengths


def _setup(path, instruction="Classify."):
    tok, model = load_tokenizer(path), load_model(path)
    fmt = build_format(TaskConfig(instruction=instruction), LABELS, tok)
    rows = make_texts(7, 5)
    rows[2]["text"] += " and a much longer tail of words to vary the prompt length"
    return tok, model, fmt, [Example(r["text"], r["label"], "t") for r in rows]


def _naive_scores(model, prompts, answers):
    out = torch.zeros(len(prompts), len(answers))
    for i, p in enumerate(prompts):
        for j, a in enumerate(answers):
            ids = torch.tensor([p + a])
            logits = model(input_ids=ids).logits[0, -ids.shape[1]:]  # (T, V); soft-prompt positions dropped
            logp = torch.log_softmax(logits.float(), -1)
            out[i, j] = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(a))
    return out


def test_shared_cache_scores_equal_full_forward(tiny_model):
    tok, model, fmt, examples = _setup(tiny_model)
    prompts = encode_prompts(tok, fmt, examples)
    answers = [encode_answer(tok, fmt, lab) for lab in LABELS]
    assert len({len(a) for a in answers}) > 1 and len({len(p) for p in prompts}) > 1
    fast = score_labels(model, prompts, answers, tok.pad_token_id, batch_size=3, max_rows=5)
    with torch.no_grad():
        slow = _naive_scores(model, prompts, answers)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_continuation_forwards_stay_within_the_cached_token_budget(tiny_model, monkeypatch):
    """Each (example, label) row copies its prompt's cache: the rows per continuation forward shrink as
    prompts grow (one row at least), and the scores do not change."""
    from tunesmith.tasks import classification

    assert classification.continuation_rows(64, 100) == classification.CONTINUATION_CACHE_TOKENS // 100
    assert classification.continuation_rows(4, 10) == 4
    assert classification.continuation_rows(64, 10**6) == 1
    tok, model, fmt, examples = _setup(tiny_model)
    prompts = encode_prompts(tok, fmt, examples)
    answers = [encode_answer(tok, fmt, lab) for lab in LABELS]
    whole = score_labels(model, prompts, answers, tok.pad_token_id, batch_size=3)
    seen = []
    real = classification._score_continuations
    monkeypatch.setattr(classification, "_score_continuations",
                        lambda m, tensors, pairs, *a: seen.append(len(pairs) * tensors[0][0].shape[2]) or real(
                            m, tensors, pairs, *a))
    budget = 3 * max(len(p) for p in prompts)
    monkeypatch.setattr(classification, "CONTINUATION_CACHE_TOKENS", budget)
    split = score_labels(model, prompts, answers, tok.pad_token_id, batch_size=3)
    assert seen and max(seen) <= budget and len(seen) > 3
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


def test_scores_without_common_prefix(tiny_plain_model):
    tok, model, fmt, examples = _setup(tiny_plain_model, instruction="")
    prompts = [encode_prompts(tok, fmt, [ex])[0] for ex in examples]
    answers = [encode_answer(tok, fmt, lab) for lab in LABELS]
    fast = score_labels(model, prompts, answers, tok.pad_token_id, batch_size=4)
    with torch.no_grad():
        slow = _naive_scores(model, prompts, answers)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_prefix_shared_loss_and_gradients_equal_plain(tiny_model):
    tok, model, fmt, examples = _setup(tiny_model)
    encoded = encode_for_training(tok, fmt, examples[:4])
    prefix_len = 6
    assert all(e.ids[:prefix_len] == encoded[0].ids[:prefix_len] for e in encoded)
    results = []
    for p in (0, prefix_len):
        model.zero_grad()
        loss, n = supervised_loss(model, collate(encoded, tok.pad_token_id, p))
        loss.backward()
        results.append((loss.item(), n, model.model.embed_tokens.weight.grad.clone()))
    (l0, n0, g0), (l1, n1, g1) = results
    assert n0 == n1 == sum(len(e.ids) - e.n_prompt for e in encoded)
    assert abs(l0 - l1) < 1e-5
    torch.testing.assert_close(g0, g1, atol=1e-5, rtol=1e-4)


def test_width_rounded_to_a_multiple_changes_neither_loss_nor_gradients(tiny_model):
    """Row batches are padded to PAD_MULTIPLE columns (fewer distinct shapes for the CPU kernels): the
    extra columns are masked and unsupervised, so loss and gradients are those of the exact width."""
    from tunesmith.config import TrainConfig
    from tunesmith.train.batching import PAD_MULTIPLE, batch_stream, pad_multiple

    tok, model, fmt, examples = _setup(tiny_model)
    encoded = encode_for_training(tok, fmt, examples[:4])
    results = []
    for multiple in (1, PAD_MULTIPLE):
        batch = collate(encoded, tok.pad_token_id, 6, multiple)
        model.zero_grad()
        loss, n = supervised_loss(model, batch)
        loss.backward()
        results.append((batch["input_ids"].shape[1], loss.item(), n, model.model.embed_tokens.weight.grad.clone()))
    (w0, l0, n0, g0), (w1, l1, n1, g1) = results
    assert w1 % PAD_MULTIPLE == 0 and w0 < w1 < w0 + PAD_MULTIPLE
    assert n0 == n1 and abs(l0 - l1) < 1e-5
    torch.testing.assert_close(g0, g1, atol=1e-5, rtol=1e-4)
    cfg, cpu = TrainConfig(batch_size=2), torch.device("cpu")
    assert pad_multiple(cfg, cpu) == PAD_MULTIPLE
    assert pad_multiple(cfg, torch.device("cuda")) == 1  # a GPU batch without padding keeps no mask
    assert pad_multiple(cfg.model_copy(update={"batch_tokens": 64}), cpu) == 1  # budgets stay exact
    stream = batch_stream(encoded, cfg, tok.pad_token_id, 6, multiple=pad_multiple(cfg, cpu))
    assert all(next(stream)["input_ids"].shape[1] % PAD_MULTIPLE == 0 for _ in range(4))
    # never past the row limit (a model's position table): the longest row, at most, when that is the limit
    longest = max(len(e.ids) for e in encoded) - 6
    assert collate(encoded, tok.pad_token_id, 6, PAD_MULTIPLE, limit=longest)["input_ids"].shape[1] == longest


def test_loss_matches_transformers_loss(tiny_model):
    tok, model, fmt, examples = _setup(tiny_model)
    batch = collate(encode_for_training(tok, fmt, examples[:3]), tok.pad_token_id)
    ours, _ = supervised_loss(model, batch)
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(ours.item() - theirs.item()) < 1e-5


ADAPTERS = ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning"]


def _randomised(path, method):
    """A PEFT-wrapped tiny model whose adapter weights are random (not the identity init)."""
    from tunesmith.config import TrainConfig
    from tunesmith.train.methods import get_method

    torch.manual_seed(0)
    model = get_method(method).apply(load_model(path), TrainConfig(method=method))
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("method", ADAPTERS)
def test_adapter_scores_equal_peft_forward(tiny_model, method):
    # Virtual tokens of prompt learning ride in the shared prefix; PEFT's own forward is the reference.
    tok, _, fmt, examples = _setup(tiny_model)
    model = _randomised(tiny_model, method).eval()
    prompts = encode_prompts(tok, fmt, examples[:4])
    answers = [encode_answer(tok, fmt, lab) for lab in LABELS]
    fast = score_labels(model, prompts, answers, tok.pad_token_id, batch_size=3, max_rows=5)
    with torch.no_grad():
        slow = _naive_scores(model, prompts, answers)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ADAPTERS)
def test_adapter_loss_equals_peft_loss(tiny_model, method):
    tok, _, fmt, examples = _setup(tiny_model)
    model = _randomised(tiny_model, method).eval()  # no dropout: both sides must be deterministic
    batch = collate(encode_for_training(tok, fmt, examples[:3]), tok.pad_token_id, prefix_len=6)
    ours, _ = supervised_loss(model, batch)
    plain = collate(encode_for_training(tok, fmt, examples[:3]), tok.pad_token_id)
    theirs = model(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"], labels=plain["labels"]).loss
    assert abs(ours.item() - theirs.item()) < 1e-4


def test_constrained_scoring_equals_brute_force_and_sums_to_one(tiny_model):
    """Constrained label scoring (only the branching points of the label trie) against a direct
    computation: one full forward per label prefix, softmax over the allowed next tokens."""
    from tunesmith.tasks.classification import score_labels_constrained
    from tunesmith.tasks.label_trie import LabelTrie

    model = load_model(tiny_model).eval()
    torch.manual_seed(0)
    prompts = [[1] + torch.randint(3, 60, (n,)).tolist() for n in (5, 9, 7, 12, 3)]
    answers = [[10, 11, 12, 2], [10, 11, 13, 2], [10, 14, 2], [20, 2], [20, 21, 2], [30, 31, 32, 2]]
    got = score_labels_constrained(model, prompts, answers, 0, batch_size=2)
    assert torch.allclose(got.exp().sum(-1), torch.ones(len(prompts)), atol=1e-5)
    with torch.no_grad():
        expected = torch.zeros(len(prompts), len(answers))
        for i, prompt in enumerate(prompts):
            for j, a in enumerate(answers):
                for k in range(len(a)):
                    kids = sorted({b[k] for b in answers if b[:k] == a[:k]})
                    if len(kids) > 1:
                        logits = model(input_ids=torch.tensor([prompt + a[:k]])).logits[0, -1]
                        expected[i, j] += torch.log_softmax(logits[kids], -1)[kids.index(a[k])]
    assert torch.allclose(got, expected, atol=1e-4)
    trie = LabelTrie.build(answers)
    # The root (10/20/30), [10], [10, 11] and [20] branch: the tree runs tokens 10, 20 and then 11.
    assert trie.tree == [(10,), (20,), (10, 11)] and trie.positions() == 3


def test_pruned_constrained_scoring_keeps_argmax_and_winner_and_skips_groups(tiny_model):
    """Pruned scoring against exact constrained scoring: same argmax, same winner probability, every
    other label below the winner, rows summing to one, and fewer tree positions run."""
    from tunesmith.tasks.classification import score_labels_constrained

    model = load_model(tiny_model).eval()
    torch.manual_seed(1)
    prompts = [[1] + torch.randint(3, 60, (n,)).tolist() for n in (5, 9, 7, 12, 3, 8, 6, 10)]
    answers = [[10, 11, 12, 2], [10, 11, 13, 2], [10, 14, 2], [20, 2], [20, 21, 2], [30, 31, 32, 2],
               [40, 2], [41, 2], [42, 43, 2], [42, 44, 2]]
    tree_positions = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda _m, _a, kw: (tree_positions.append(kw["input_ids"].numel())
                            if getattr(kw.get("attention_mask"), "ndim", 0) == 4 else None),
        with_kwargs=True)
    exact = score_labels_constrained(model, prompts, answers, 0, batch_size=4)
    n_exact, tree_positions[:] = sum(tree_positions), []
    pruned = score_labels_constrained(model, prompts, answers, 0, batch_size=4, prune=True)
    hook.remove()
    assert 0 < sum(tree_positions) < n_exact == len(prompts) * 4  # tree: (10,), (20,), (42,), (10, 11)
    assert torch.equal(pruned.argmax(-1), exact.argmax(-1))
    winner = exact.argmax(-1, keepdim=True)
    assert torch.allclose(pruned.gather(1, winner), exact.gather(1, winner), atol=1e-5)
    assert (pruned <= pruned.gather(1, winner) + 1e-6).all()
    assert torch.allclose(pruned.exp().sum(-1), torch.ones(len(prompts)), atol=1e-5)
    skipped = ~torch.isclose(pruned, exact, atol=1e-5)
    assert skipped.any() and not skipped.gather(1, winner).any()


def test_constrained_scoring_through_predict(tiny_model, tiny_plain_model):
    from dataclasses import replace

    from tunesmith.tasks.predict import predict

    for path in (tiny_model, tiny_plain_model):
        tok, model, fmt, examples = _setup(path)
        exact = predict(model, tok, replace(fmt, label_scoring="constrained"), examples, batch_size=2)
        assert all(p in LABELS for p in exact.texts)
        assert all(abs(sum(p.values()) - 1) < 1e-3 for p in exact.probabilities)
        pruned = predict(model, tok, replace(fmt, label_scoring="constrained_pruned"), examples, batch_size=2)
        assert pruned.texts == exact.texts
    cfg = TaskConfig(instruction="x", label_scoring="constrained")
    assert build_format(cfg, LABELS, load_tokenizer(tiny_model)).label_scoring == "constrained"
