"""Reading a GGUF export back with a reader independent of tunesmith's writer, to score the test split
the way the eval stage scored the run.

Two readers:
- llama.cpp (llama-cpp-python), when it imports: the engine people run GGUF files with. Prompts are
  tokenized by the GGUF's own vocabulary (llama.cpp's tokenizer; template text with control tokens
  parsed, user text literal, as models/tokens.py does for Hugging Face tokenizers) and the chat template
  is the one stored in the file. Labels are scored from llama.cpp's logits exactly as the eval stage
  scores them (sequence: the sum of the label tokens' log-probabilities; constrained: the label trie's
  softmax over allowed tokens, tasks/label_trie.py); generation decodes greedily until the file's EOS,
  EOT or EOM id, each step through the eval stage's own logits processors and next-token function
  (tasks/sampling.py), so a repetition penalty is applied as `generate` applies it.
- transformers' GGUF loader otherwise (it dequantizes the file into a torch model and builds a
  tokenizer from the file's vocabulary), scored by tunesmith's own `predict`.

Both also count the test prompts whose token ids differ from the run's tokenizer's (`token_mismatches`):
a wrong pre-tokenizer or vocabulary shows there even when the predictions happen to agree.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tunesmith.optimize.gguf import llama_cpp_available
from tunesmith.tasks.predict import encode_prompts, predict
from tunesmith.tasks.prompts import PromptFormat, encode_answer


@dataclass
class ReadBack:
    """What a reader made of an export: predictions in test order and how it got them."""

    texts: list[str]
    load_seconds: float
    reader: str
    token_mismatches: int | None = None
    modelfile: dict | None = None  # --format ollama: how its Modelfile TEMPLATE matched the run's prompts


def read_gguf(path: Path, project, fmt: PromptFormat, test, run_tokenizer) -> ReadBack:
    """Score `test` with the GGUF at `path`: llama.cpp when available, decoding is greedy and it decodes
    the file on this machine, else transformers' GGUF loader (sampled decoding is reproduced only by the
    torch reader's seeded sampler)."""
    greedy = project.eval.generation.temperature == 0
    if llama_cpp_available() and (fmt.labels or greedy):
        why = llama_cpp_fails(path)
        if why is None:
            return read_llama_cpp(path, project, fmt, test, run_tokenizer)
        print(f"warning: llama.cpp cannot decode {path.name} on this machine ({why}); it is read back with "
              "transformers' GGUF loader instead", file=sys.stderr)
    return read_transformers_gguf(path, project, fmt, test, run_tokenizer)


# A forward of a batch of tokens through the file, in a child: where a llama.cpp build's kernels do not run
# on this CPU (a native build using AMX where the kernel does not grant it), the child dies, not the export.
_SMOKE = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, n_batch=128, "
          "n_gpu_layers=0, verbose=False); n = llm.n_vocab(); llm.eval([i % n for i in range(1, 65)])")
SMOKE_TIMEOUT_S = 600


def llama_cpp_fails(path: Path) -> str | None:
    """Why llama.cpp cannot decode the GGUF at `path` here (how its child process ended), or None."""
    try:
        done = subprocess.run([sys.executable, "-c", _SMOKE, str(path)], capture_output=True,
                              timeout=SMOKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"a forward of 64 tokens took over {SMOKE_TIMEOUT_S} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-done.returncode}"
        return f"its process was killed by {name}"
    last = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
    return f"exit {done.returncode}: {last[0][:200]}"


def read_transformers_gguf(path: Path, project, fmt: PromptFormat, test, run_tokenizer) -> ReadBack:
    """transformers' GGUF loader feeding tunesmith's predict()."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, config=_gguf_config(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    load_seconds = time.perf_counter() - started
    if tokenizer.pad_token_id is None:  # padding only; masked out
        tokenizer.pad_token = tokenizer.eos_token
    mismatches = _mismatches(encode_prompts(tokenizer, fmt, test), encode_prompts(run_tokenizer, fmt, test))
    preds = predict(model, tokenizer, fmt, test, batch_size=project.eval.batch_size,
                    max_new_tokens=project.eval.max_new_tokens, sampling=project.eval.generation)
    return ReadBack(preds.texts, load_seconds, f"transformers {transformers.__version__} GGUF loader", mismatches)


def _gguf_config(path: Path):
    """transformers' config read from the file, with `attention_bias` set when the file holds attention
    biases: its GGUF loader does not infer that from the tensors and would silently drop them."""
    import gguf
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if any(t.name.endswith("attn_q.bias") for t in gguf.GGUFReader(str(path)).tensors):
        config.attention_bias = True
    return config


def read_llama_cpp(path: Path, project, fmt: PromptFormat, test, run_tokenizer) -> ReadBack:
    """llama.cpp (CPU) with the GGUF's own vocabulary and chat template."""
    import llama_cpp

    started = time.perf_counter()
    # A label answer fits in max_length with its prompt (tasks/predict.py answer_budget); decoding adds tokens.
    n_ctx = fmt.max_length + (0 if fmt.labels else project.eval.max_new_tokens)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
                          n_gpu_layers=0, verbose=False, seed=0)
    load_seconds = time.perf_counter() - started
    try:
        vocab = GGUFVocab(llm, run_tokenizer)
        prompts = encode_prompts(vocab, fmt, test)
        mismatches = _mismatches(prompts, encode_prompts(run_tokenizer, fmt, test))
        if fmt.labels:
            texts = _classify(llm, vocab, fmt, prompts)
        else:
            texts = _generate(llm, vocab, prompts, project.eval.max_new_tokens, project.eval.generation)
    finally:
        llm.close()
    return ReadBack(texts, load_seconds, f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", mismatches)


class GGUFVocab:
    """The part of a Hugging Face tokenizer tunesmith's prompt code uses, answered from a GGUF through
    llama.cpp: tokenizing (control tokens parsed in template text, never in user text), its added
    tokens, EOS and the chat template stored in the file. Only rendering the template's Jinja is
    borrowed from `renderer` (a transformers tokenizer), with the GGUF's template string."""

    def __init__(self, llm, renderer):
        import llama_cpp
        from tokenizers import AddedToken

        self.llm, self.renderer = llm, renderer
        self.chat_template = llm.metadata.get("tokenizer.chat_template")
        model = llm._model  # llama-cpp-python's model wrapper: per-token text and attributes
        control, user = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL, llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        self.added_tokens_decoder = {}
        for i in range(llm.n_vocab()):
            attr = model.token_get_attr(i)
            if attr & (control | user):
                self.added_tokens_decoder[i] = AddedToken(model.token_get_text(i), special=bool(attr & control),
                                                          normalized=False)
        self.eos_token_id = llm.token_eos()
        self.eos_token = model.token_get_text(self.eos_token_id)
        # The ids the file says generation ends at (optimize/gguf.py gguf_stops writes all three keys it needs).
        extra = (llm.metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom"))
        self.stop = sorted({self.eos_token_id} | {int(t) for t in extra if t is not None})

    def __call__(self, text: str, add_special_tokens: bool = False, split_special_tokens: bool = False) -> dict:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=not split_special_tokens)
        return {"input_ids": ids}

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        return self.renderer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.llm.detokenize(list(ids), special=not skip_special_tokens).decode("utf-8", errors="replace")


def _classify(llm, vocab: GGUFVocab, fmt: PromptFormat, prompts: list[list[int]]) -> list[str]:
    import torch

    from tunesmith.tasks.classification import predict_labels

    answers = [encode_answer(vocab, fmt, lab) for lab in fmt.labels]
    scores = torch.stack([label_scores(llm, p, answers, fmt.label_scoring) for p in prompts])
    return predict_labels(scores, fmt.labels)[0]


def label_scores(llm, prompt: list[int], answers: list[list[int]], scoring: str):
    """(L,) label scores after one prompt from llama.cpp's logits: the eval stage's sequence
    log-probability, or its constrained probability (constrained_pruned has the same argmax)."""
    import torch

    from tunesmith.tasks.label_trie import LabelTrie, node_log_probs

    llm.reset()
    llm.eval(prompt)
    base = len(prompt)
    root = torch.from_numpy(llm.scores[base - 1].copy())
    at: dict[tuple, torch.Tensor] = {(): root}  # logits after the prompt and each label prefix
    for a in answers:
        llm.n_tokens = base  # keep the prompt's cache, drop the previous label's tokens
        if len(a) > 1:
            llm.eval(a[:-1])
        for k in range(1, len(a)):
            at[tuple(a[:k])] = torch.from_numpy(llm.scores[base + k - 1].copy())
    if scoring == "sequence":
        return torch.stack([sum(torch.log_softmax(at[tuple(a[:k])], -1)[a[k]] for k in range(len(a)))
                            for a in answers])
    trie = LabelTrie.build(answers)
    tree = torch.stack([at[p] for p in trie.tree])[None] if trie.tree else None  # (1, Q, V)
    nodes = node_log_probs(root[None], tree, trie, lambda h, rows: h[..., rows])
    return (nodes @ trie.choice.T)[0]


def _generate(llm, vocab: GGUFVocab, prompts: list[list[int]], max_new_tokens: int, settings) -> list[str]:
    """Greedy completions (the eval stage's processors, built once) cut at the settings' stop strings."""
    from tunesmith.tasks.sampling import logits_processors

    processors = logits_processors(settings)
    return [_greedy(llm, vocab, p, max_new_tokens, settings, processors) for p in prompts]


def _greedy(llm, vocab: GGUFVocab, prompt: list[int], max_new_tokens: int, settings, processors) -> str:
    """One greedy completion until the GGUF's EOS/EOT/EOM id, each token chosen by the eval stage's
    `next_token` from llama.cpp's logits and the ids so far (the repetition penalty sees the prompt and
    the answer, as in `generate`); decoded without control tokens (as tasks/generation.py)."""
    import torch

    from tunesmith.tasks.sampling import cut_at_stop, next_token

    llm.reset()
    llm.eval(prompt)
    seen = list(prompt)
    for _ in range(max_new_tokens):
        logits = torch.from_numpy(llm.scores[llm.n_tokens - 1].copy())[None]  # (1, V)
        token = next_token(logits, torch.tensor([seen]), settings, processors)
        if token in vocab.stop:
            break
        seen.append(token)
        llm.eval([token])
    return cut_at_stop(vocab.decode(seen[len(prompt):], skip_special_tokens=True), settings.stop)[0].strip()


def _mismatches(ids: list[list[int]], reference: list[list[int]]) -> int:
    """How many prompts a reader tokenized differently from the run's tokenizer."""
    return sum(a != b for a, b in zip(ids, reference))
