"""Fixtures: a tiny random causal LM with a real tokenizer, built in-process (no downloads)."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Runs made by tests go into a throwaway registry, never the user's.
# Runs prepare their data in this process: a spawned child per run would add seconds to every
# end-to-end test (tests/test_data.py covers the child process itself).
os.environ.setdefault("TUNESMITH_DATA_PROCESS", "inline")
os.environ.setdefault("TUNESMITH_REGISTRY", str(Path(tempfile.mkdtemp(prefix="tunesmith-registry-")) / "runs.sqlite"))
# A pinned thread count: tunesmith would otherwise fit torch's threads to the load of the machine
# (cores.py), and the servers and children tests start are that load: results compared across two
# runs must not depend on it. tests/test_cores.py unpins it where it tests the fitting itself.
os.environ.setdefault("OMP_NUM_THREADS", str(__import__("torch").get_num_threads()))
COLOURS = {"red": "alpha", "blue": "beta", "green": "gamma"}
FILLER = "the a my card bank money please help today now where when why how is was can you".split()


def make_texts(n: int, seed: int) -> list[dict]:
    """Synthetic classification rows: the colour word decides the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        words = rng.sample(FILLER, 5)
        words.insert(rng.randrange(6), colour)
        rows.append({"text": " ".join(words), "label": COLOURS[colour]})
    return rows


def toy_pairs(n: int):
    """Preference pairs on the colour words: chosen the colour's label, rejected the next one."""
    from tunesmith.data.pairs import Pair

    out = []
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        wrong = list(COLOURS.values())[(i + 1) % 3]
        out.append(Pair(f"my card {colour} now", COLOURS[colour], wrong, source=f"toy:{i}"))
    return out


def build_tiny_checkpoint(folder: Path, chat_template: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["text"] for r in make_texts(60, 0)] + ["Classify. Answer with one of: alpha, beta, gamma."]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=fast.pad_token_id,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id)
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory) -> Path:
    """The same tiny model with no chat template (the plain prompt path)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-plain"), chat_template=False)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


PROJECT = """name: tiny
model: {model}
task:
  type: classification
  instruction: "Classify."
data:
  train: train.jsonl
  test: test.jsonl
  validation: 0.2
objective:
  metric: accuracy
  target: 0.0
train:
  method: {method}
  max_steps: 6
  eval_every: 3
  batch_size: 4
  learning_rate: 0.01
eval:
  latency_samples: 2
"""


GEN_PROJECT = """name: {name}
model: {model}
task:
  type: generation
  instruction: "Continue."
data:
  train: train.jsonl
  test: test.jsonl
  validation: 0.2
objective:
  metric: exact_match
train:
  method: {method}
  max_steps: {steps}
  batch_size: 4
eval:
  latency_samples: 1
  max_new_tokens: {new_tokens}
"""


def one_error(result) -> str:
    """The one `error:` line of a CLI result that must be bad input: exit 2, no traceback, not an internal
    error."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output and "internal error" not in lines[0], result.output
    return lines[0]


def train_tiny_run(folder: Path, tiny_model: Path, method: str = "lora") -> Path:
    """A trained and evaluated tiny classification run at folder/run (30 training rows, 9 test rows),
    through the real CLI."""
    from typer.testing import CliRunner

    from tunesmith.cli import app

    write_jsonl(folder / "train.jsonl", make_texts(30, 1))
    write_jsonl(folder / "test.jsonl", make_texts(9, 2))
    (folder / "project.yaml").write_text(PROJECT.format(model=tiny_model, method=method), encoding="utf-8")
    result = CliRunner().invoke(app, ["run", str(folder / "project.yaml"), "--out", str(folder / "run"), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    return folder / "run"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model) -> Path:
    """One trained and evaluated tiny run per test module; tests damage copies of it (`run`)."""
    return train_tiny_run(tmp_path_factory.mktemp("finished"), tiny_model)


@pytest.fixture()
def run(finished, tmp_path) -> Path:
    """A copy of `finished` at tmp_path/run, its project beside it as it trained. A module that defines its
    own `run` uses that one."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    for name in ("project.yaml", "train.jsonl", "test.jsonl"):
        shutil.copy(finished.parent / name, tmp_path / name)
    return copy


@pytest.fixture()
def tiny_project(tmp_path, tiny_model) -> Path:
    """A classification project on the tiny model; returns the config path."""
    write_jsonl(tmp_path / "train.jsonl", make_texts(30, 1))
    write_jsonl(tmp_path / "test.jsonl", make_texts(9, 2))
    cfg = tmp_path / "project.yaml"
    cfg.write_text(PROJECT.format(model=tiny_model, method="lora"), encoding="utf-8")
    return cfg


def reproduce_predictions(run_dir: Path, base_path: Path) -> tuple[int, int]:
    """Re-predict a run's test file with transformers + peft alone (full forward per label, no
    tunesmith code); returns (agreements, rows)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), run_dir / "model").eval()
    prompt = json.loads((run_dir / "model" / "prompt.json").read_text())
    system = prompt["instruction"] + "\nAnswer with one of: " + ", ".join(prompt["labels"]) + "."
    rows = [json.loads(line) for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    agree = 0
    for row in rows:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": row["text"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
        scores = {}
        for label in prompt["labels"]:
            a = tokenizer(label + "<|im_end|>", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0], -1)  # (T, V)
            scores[label] = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(a))
        agree += max(scores, key=scores.get) == row["prediction"]
    return agree, len(rows)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app, **config):
    """A real uvicorn server on a loopback port in a thread (`config`: more uvicorn.Config settings): (url, stop)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(10)
    return f"http://127.0.0.1:{port}", stop


def wait_until(check, timeout: float = 180.0, what: str = "condition") -> None:
    """Poll `check` every 0.2 s until it is true; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def answers(url: str) -> bool:
    """Whether a tunesmith server at `url` answers /healthz with 200."""
    import httpx

    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def serve_process(args: list[str], env: dict, stderr: Path) -> subprocess.Popen:
    """`tunesmith serve ARGS` as a child process, its stderr in the file `stderr`."""
    with open(stderr, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
