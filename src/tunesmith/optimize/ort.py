"""The `onnx` engine: the plain decoder exported to ONNX and run by ONNX Runtime, in fp32 or with
ORT's dynamic int8 quantization of the weight matmuls.

The graph maps (input_ids, position_ids, an additive 4D attention mask) to the final hidden states;
the LM head (`head.safetensors`) is applied outside, to the rows a task needs. The graph keeps no
KV cache, so a classification prompt and its label tokens go through one call: the label prefixes
a score needs form a token tree after the prompt, and the mask lets each tree token see its prompt's
real tokens and its own ancestors. Each prompt is still run once for all labels. Generation re-runs
the sequence at every new token (slower than a cached decoder; fine for short answers).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from tunesmith.data.examples import Example
from tunesmith.models.tokens import left_pad, stop_ids
from tunesmith.optimize.predictor import Predictor
from tunesmith.tasks.classification import predict_labels
from tunesmith.tasks.label_trie import LabelTrie, node_log_probs, tree_inputs
from tunesmith.tasks.predict import Predictions, encode_prompts, inverse
from tunesmith.tasks.prompts import PromptFormat, label_answers, read_prompt_format

GRAPH, HEAD = "model.onnx", "head.safetensors"
DECODER_PARTS = ("embed_tokens", "rotary_emb", "layers", "norm")
# Kept in fp32 by ORT int8: the MLP output projection's input (activation x up projection) carries
# the outlier channels SmoothQuant's folding into the norms does not reach. Measured on the
# quickstart model: all matmuls int8 -3.1 accuracy points, these in fp32 +1.3 points, 11% slower.
FLOAT_MATMULS = ("down_proj",)  # the Llama-style name; only Llama-architecture models were measured
VOCAB_CHUNK = 16  # tree positions per full-vocabulary softmax (B x 16 x V floats at a time)


def available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


class _Hidden(torch.nn.Module):
    """The decoder's layers with the mask given, not built: no masking code to trace."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids, position_ids, attention_mask):  # (B, T), (B, T), (B, 1, T, T)
        h = self.decoder.embed_tokens(input_ids)                          # (B, T, H)
        rotary = self.decoder.rotary_emb(h, position_ids=position_ids)
        for layer in self.decoder.layers:
            h = layer(h, attention_mask=attention_mask, position_ids=position_ids, position_embeddings=rotary)
            h = h[0] if isinstance(h, tuple) else h
        return self.decoder.norm(h)                                       # (B, T, H)


def export(model, out_dir: Path) -> None:
    """Write `model.onnx` (decoder to hidden states) and `head.safetensors` (the LM head) for a plain
    causal LM; raises ValueError when the decoder is not laid out as embeddings, rotary, layers, norm."""
    from safetensors.torch import save_file

    decoder = model.get_decoder()
    missing = [p for p in DECODER_PARTS if not hasattr(decoder, p)]
    if missing:
        raise ValueError(f"decoder has no {', '.join(missing)}")
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # plain matmul + mask + softmax: exports everywhere
    try:
        ids = torch.ones((2, 5), dtype=torch.long)
        args = (ids, torch.arange(5).expand(2, -1), torch.zeros((2, 1, 5, 5)))
        axes = {"input_ids": {0: "batch", 1: "tokens"}, "position_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 2: "tokens", 3: "keys"}, "hidden": {0: "batch", 1: "tokens"}}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: harmless here
            torch.onnx.export(_Hidden(decoder).eval(), args, str(Path(out_dir) / GRAPH), dynamo=False,
                              input_names=["input_ids", "position_ids", "attention_mask"], output_names=["hidden"],
                              dynamic_axes=axes, opset_version=17)
    finally:
        model.set_attn_implementation(previous)
    head = model.get_output_embeddings().weight.detach().float().contiguous().clone()
    save_file({"weight": head}, str(Path(out_dir) / HEAD))


def quantize(graph: Path, out: Path) -> list[str]:
    """ORT dynamic int8: weight matmuls with int8 weights per output channel, activations uint8 per
    call; the MLP output projections stay fp32 (FLOAT_MATMULS). Returns the matmuls left in fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep = [n.name for n in onnx.load(str(graph), load_external_data=False).graph.node
            if n.op_type == "MatMul" and any(f"/{part}/" in n.name for part in FLOAT_MATMULS)]

    logging.disable(logging.WARNING)  # its advice to run shape pre-processing is for static quantization
    try:
        quantize_dynamic(str(graph), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=keep,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        logging.disable(logging.NOTSET)
    return keep


class OrtDecoder:
    """An ONNX Runtime session over the exported graph, and the LM head."""

    def __init__(self, path: Path):
        import onnxruntime as ort
        from safetensors.torch import load_file

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(Path(path) / GRAPH), options, providers=["CPUExecutionProvider"])
        self.head = load_file(str(Path(path) / HEAD))["weight"]          # (V, H)

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """(B, T, H) final hidden states; `allowed` (B, 1, T, T) says which keys each query sees."""
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        feeds = {"input_ids": ids.numpy(), "position_ids": positions.numpy(), "attention_mask": mask.numpy()}
        return torch.from_numpy(self.session.run(["hidden"], feeds)[0])


def prompt_and_tree(prompts: list[list[int]], pad_id: int, tree: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
    """ids (B, S+Q), positions (B, S+Q) and allowed keys (B, 1, S+Q, S+Q): left-padded prompts, then
    the tree tokens (ids (Q,), depths (Q,), ancestor-or-self (Q, Q)) after each prompt."""
    tree_ids, depth, sees = tree
    ids, mask = left_pad(prompts, pad_id)                                  # (B, S)
    real = mask.bool()
    n_b, n_s, n_q = ids.shape[0], ids.shape[1], len(tree_ids)
    causal = torch.ones((n_s, n_s), dtype=torch.bool).tril()
    prompt_rows = (causal[None] & real[:, None, :]) | torch.eye(n_s, dtype=torch.bool)  # padding sees itself
    top = torch.cat([prompt_rows, torch.zeros((n_b, n_s, n_q), dtype=torch.bool)], dim=2)
    bottom = torch.cat([real[:, None, :].expand(-1, n_q, -1), sees.expand(n_b, -1, -1)], dim=2)
    allowed = torch.cat([top, bottom], dim=1)[:, None]                     # (B, 1, S+Q, S+Q)
    positions = torch.cat([(mask.cumsum(-1) - 1).clamp(min=0), mask.sum(-1, keepdim=True) + depth - 1], dim=1)
    return torch.cat([ids, tree_ids.expand(n_b, -1)], dim=1), positions, allowed


def score_constrained(lm: OrtDecoder, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                      batch_size: int) -> torch.Tensor:
    """(N, L) constrained label scores (label_trie), prompt and tree in one call per batch."""
    trie = LabelTrie.build(answers)
    tree = trie.tree_inputs()
    out = []
    for start in range(0, len(prompts), batch_size):
        h = lm.hidden(*prompt_and_tree(prompts[start:start + batch_size], pad_id, tree))   # (B, S+Q, H)
        n_s = h.shape[1] - trie.positions()
        out.append(node_log_probs(h[:, n_s - 1], h[:, n_s:], trie, lm.head) @ trie.choice.T)
    return torch.cat(out)


def score_sequence(lm: OrtDecoder, prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                   batch_size: int) -> torch.Tensor:
    """(N, L) summed log-probabilities of every answer token; the answers' shared prefixes run once."""
    prefixes = sorted({tuple(a[:k]) for a in answers for k in range(1, len(a))}, key=lambda p: (len(p), p))
    node = {p: i + 1 for i, p in enumerate(prefixes)}                     # 0: the prompt's last token
    pairs = [(lab, node.get(tuple(a[:k]), 0), a[k]) for lab, a in enumerate(answers) for k in range(len(a))]
    label, where, token = (torch.tensor(c) for c in zip(*pairs))
    tree = tree_inputs(prefixes)
    out = []
    for start in range(0, len(prompts), batch_size):
        h = lm.hidden(*prompt_and_tree(prompts[start:start + batch_size], pad_id, tree))   # (B, S+Q, H)
        states = h[:, h.shape[1] - len(prefixes) - 1:]                    # (B, 1+Q, H)
        scores = torch.zeros(len(h), len(answers))
        for c in range(0, states.shape[1], VOCAB_CHUNK):
            logp = torch.log_softmax(states[:, c:c + VOCAB_CHUNK] @ lm.head.T, dim=-1)   # (B, c, V)
            sel = (where >= c) & (where < c + VOCAB_CHUNK)
            scores.index_add_(1, label[sel], logp[:, where[sel] - c, token[sel]])
        out.append(scores)
    return torch.cat(out)


def generate_ort(lm: OrtDecoder, tokenizer, prompts: list[list[int]], limits: list[int]) -> list[list[int]]:
    """Greedy continuations (without the stop token), at most limits[i] tokens each."""
    stops, empty = set(stop_ids(tokenizer)), tree_inputs([])
    new: list[list[int]] = [[] for _ in prompts]
    alive = [i for i, n in enumerate(limits) if n > 0]
    while alive:
        h = lm.hidden(*prompt_and_tree([prompts[i] + new[i] for i in alive], tokenizer.pad_token_id, empty))
        nxt = (h[:, -1] @ lm.head.T).argmax(-1).tolist()                  # (B,)
        for i, t in zip(alive, nxt):
            if t not in stops:
                new[i].append(t)
        alive = [i for i, t in zip(alive, nxt) if t not in stops and len(new[i]) < limits[i]]
    return new


def max_logit_diff(model, path: Path, tokenizer, fmt: PromptFormat, examples: list[Example]) -> float:
    """max |logit| difference of the first answer token between the torch model and the export at `path`."""
    from tunesmith.optimize.parity import prompt_logits

    if not examples:
        return 0.0
    lm, prompts = OrtDecoder(path), encode_prompts(tokenizer, fmt, examples)
    h = torch.cat([lm.hidden(*prompt_and_tree(prompts[s:s + 8], tokenizer.pad_token_id, tree_inputs([])))[:, -1]
                   for s in range(0, len(prompts), 8)])                     # (N, H)
    return float((h @ lm.head.T - prompt_logits(model, tokenizer, fmt, examples)).abs().max())


def load_ort(path: Path, max_new_tokens: int = 64) -> Predictor:
    from tunesmith.models.load import load_tokenizer

    path = Path(path)
    tokenizer, lm = load_tokenizer(path), OrtDecoder(path)
    fmt = read_prompt_format(path / "prompt.json")

    def run(examples: list[Example], batch_size: int) -> Predictions:
        prompts = encode_prompts(tokenizer, fmt, examples)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
        prompts = [prompts[i] for i in order]
        if fmt.labels:
            answers = label_answers(tokenizer, fmt)
            scorer = score_sequence if fmt.label_scoring == "sequence" else score_constrained
            scores = scorer(lm, prompts, answers, tokenizer.pad_token_id, batch_size)
            return Predictions(*predict_labels(scores[torch.tensor(inverse(order))], fmt.labels))
        ids = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            ids += generate_ort(lm, tokenizer, batch, [max_new_tokens] * len(batch))
        texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
        return Predictions([texts[i] for i in inverse(order)])

    def complete(prompts: list[list[int]], limits: list[int]) -> list[list[int]]:
        return generate_ort(lm, tokenizer, prompts, limits)
    return Predictor(run, None, fmt, tokenizer, complete=complete)
