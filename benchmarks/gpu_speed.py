"""GPU training speed and memory: tunesmith vs TRL SFTTrainer (defaults + bf16) vs TRL with packing=True.

Random-weight Llama models of real shapes (SmolLM2-135M, a 1.07B, Llama-3-8B dimensions) with SmolLM2's
tokenizer are built and saved as safetensors once per shape, so every tool loads the same checkpoint from
a path. Same rows for every tool (BANKING77 messages as the quickstart project formats them: its task,
instruction and chat template), same LoRA (the project's: r16 on all linear layers), batch 16, one epoch.
Each (shape, tool) trains in a fresh subprocess so its GPU peak (torch.cuda.max_memory_allocated, counted
from just before training) is its own. The 8b shape trains tunesmith only, QLoRA (train.quantize nf4,
gradient checkpointing on) on rows of task.max_length=512 tokens, and is checked against a 16 GB peak.

tokens/s is counted the same way for every tool: the rows' prompt + answer tokens as the chat template
renders them (each tool's own count is printed beside it); on the QLoRA shapes' long rows, which tunesmith
cuts to task.max_length and trains alone, tunesmith's own count. % peak = 4 x base parameters x tokens/s over the
bf16 matmul rate measured at the start of the run. Results are written after every run (--json-out), so a
run stopped by a time limit still leaves what it measured.

    python benchmarks/gpu_speed.py --json-out /tmp/gpu_speed.json           # the GPU run (about 8 minutes)
    python benchmarks/gpu_speed.py --tiny                                     # CPU smoke test (2-layer shape)
    python benchmarks/gpu_speed.py --shapes 1b --set train.gradient_checkpointing=true   # a tunesmith setting

On the GPU machine, through the device tool: benchmarks/gpu_device.sh (it says how).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from train_speed import FLOP_PER_TOKEN, bf16_peak_gflops, gpu_peak_mb

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "examples" / "quickstart" / "project.yaml"
BANKING77 = ROOT / "tests" / "data" / "banking77" / "train.csv"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TOOLS = ("tunesmith", "trl", "trl-packing")
# Targets of issue 18: 1b LoRA against TRL, 8b QLoRA peak GPU memory (16 GB, decimal).
TARGET_SPEED_DEFAULT, TARGET_SPEED_PACKING, TARGET_8B_BYTES = 3.0, 1.5, 16e9


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model shape to build with random weights, and how it is trained."""

    dims: dict
    tools: tuple[str, ...] = TOOLS
    quantize: str = "none"            # train.quantize for tunesmith
    long_rows: bool = False           # rows filled to task.max_length tokens (several messages joined)
    max_length: int = 512             # task.max_length
    rows: int | None = None           # rows of a QLoRA shape (--rows-qlora overrides; LoRA shapes take --rows)
    tunesmith: dict = dataclasses.field(default_factory=dict)  # train.* settings for tunesmith


def _llama(layers: int, hidden: int, heads: int, kv: int, inter: int, tied: bool) -> dict:
    return {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": inter, "tie_word_embeddings": tied}


QLORA = {"gradient_checkpointing": True}  # the 24 GB recipe: activations of 16 x 512 tokens recomputed per layer
SHAPES = {
    "1b": Shape(_llama(16, 2048, 32, 8, 8192, True)),
    "8b": Shape(_llama(32, 4096, 32, 8, 14336, False), tools=("tunesmith",), quantize="nf4", long_rows=True,
                rows=128, tunesmith=QLORA),
    "135m": Shape(_llama(30, 576, 9, 3, 1536, True)),
    # CPU smoke test: the same code paths on a 2-layer model (LoRA side by side, then QLoRA on long rows).
    "tiny": Shape(_llama(2, 64, 4, 2, 128, True)),
    "tiny-qlora": Shape(_llama(2, 64, 4, 2, 128, True), tools=("tunesmith",), quantize="nf4", long_rows=True,
                        max_length=128, rows=16, tunesmith=QLORA),
}
# The figures issue 18 sets targets for, by shape.
TARGETED = {"1b": ("1b tokens/s tunesmith/trl", "1b tokens/s tunesmith/trl-packing", "1b GPU peak tunesmith/trl"),
            "8b": ("8b QLoRA GPU peak",)}
DEFAULT_SHAPES = "1b,8b,135m"  # the targets first: a run cut short by its time limit still measures them


def main() -> None:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu-speed-", dir=args.workdir))
    report = {"env": environment(), "args": vars(args), "runs": []}
    try:
        report["env"]["bf16_peak_gflops"] = round(bf16_peak_gflops(), 1)
        print(f"env: {json.dumps(report['env'])}", flush=True)
        args.tokenizer = tokenizer = tokenizer_dir(args, work)
        for name in args.shapes.split(","):
            try:
                run_shape(name, args, tokenizer, work, report, started)
            except Exception as e:  # noqa: BLE001 - one shape's failure must not lose the others' figures
                traceback.print_exc()
                report["runs"].append({"shape": name, "tool": "setup", "error": repr(e), "elapsed_s": 0.0})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["verdicts"] = summarise(report["runs"], report["env"]["bf16_peak_gflops"])
    write_json(args.json_out, report)
    print(f"\ntotal elapsed {time.perf_counter() - started:.0f} s", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)} (default {DEFAULT_SHAPES})")
    ap.add_argument("--rows", type=int, default=None, help="training rows per LoRA run (default 1024; --tiny 32)")
    ap.add_argument("--rows-qlora", type=int, default=None, help="rows of the QLoRA shapes (default 8b 128, tiny 16)")
    ap.add_argument("--tools", default=",".join(TOOLS), help="comma list of " + ", ".join(TOOLS))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and 32 rows: a CPU smoke test")
    ap.add_argument("--json-out", type=Path, default=None, help="write all results here (after every run)")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="folder with SmolLM2's tokenizer files (default: the smollm2-135m-instruct checkpoint)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="train.* setting for tunesmith's runs, e.g. train.gradient_checkpointing=true (repeatable)")
    ap.add_argument("--deadline-s", type=float, default=None, help="skip runs that would start after this many s")
    ap.add_argument("--workdir", default=None, help="where models are saved (default: the temp dir)")
    for hidden in ("--worker", "--shape", "--model-dir", "--rows-file"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is None:
        args.shapes = args.shapes or ("tiny,tiny-qlora" if args.tiny else DEFAULT_SHAPES)
        args.rows = args.rows or (32 if args.tiny else 1024)
        unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
        unknown += [t for t in args.tools.split(",") if t not in TOOLS]
        if unknown:
            ap.error(f"unknown shape or tool: {', '.join(unknown)}")
    return args


def environment() -> dict:
    import importlib.metadata as md

    import torch

    cuda = torch.cuda.is_available()
    env = {"python": sys.version.split()[0], "gpu": torch.cuda.get_device_name() if cuda else None,
           "cuda": torch.version.cuda}
    for package in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets"):
        try:
            env[package] = md.version(package)
        except md.PackageNotFoundError:
            env[package] = None
    return env


def tokenizer_dir(args, work: Path) -> Path:
    """A folder holding only SmolLM2's tokenizer files (the weights are never needed here)."""
    source = args.tokenizer
    if source is None:
        from tunesmith.models.resolve import resolve_model

        source = resolve_model("smollm2-135m-instruct")
    target = work / "tokenizer"
    target.mkdir()
    for name in TOKENIZER_FILES:
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, target / name)
    if not (target / "tokenizer.json").is_file():
        raise SystemExit(f"error: no tokenizer.json in {source} (--tokenizer)")
    return target


def run_shape(name: str, args, tokenizer: Path, work: Path, report: dict, started: float) -> None:
    """Build the shape's checkpoint, train each of its tools on it in turn, then delete it."""
    shape = SHAPES[name]
    tools = [t for t in args.tools.split(",") if t in shape.tools]
    if not tools:
        return
    if _late(args, started):
        report["runs"] += [_skipped(name, tool, args) for tool in tools]
        return
    rows = (args.rows_qlora or shape.rows) if shape.quantize != "none" else args.rows
    rows_file = prepare_rows(shape, rows, work, tokenizer)
    model_dir = work / f"model-{name}"
    built = run_worker("build", name, model_dir, rows_file, args, started)
    if "error" in built:
        report["runs"].append({"shape": name, "tool": "build", **built})
        return
    print(f"{name}: built {built['params'] / 1e6:.0f}M parameters in {built['elapsed_s']:.0f} s", flush=True)
    common = json.loads(rows_file.read_text())["tokens"]
    for tool in tools:
        if _late(args, started):
            report["runs"].append(_skipped(name, tool, args))
            continue
        row = {"shape": name, "tool": tool, **run_worker(tool, name, model_dir, rows_file, args, started)}
        row.update(_figures(row, common, built.get("params"), report["env"]["bf16_peak_gflops"]))
        report["runs"].append(row)
        print_run(row)
        write_json(args.json_out, report)
    shutil.rmtree(model_dir, ignore_errors=True)


def _late(args, started: float) -> bool:
    return args.deadline_s is not None and time.perf_counter() - started > args.deadline_s


def _skipped(shape: str, tool: str, args) -> dict:
    print(f"{shape} {tool}: not run (past --deadline-s {args.deadline_s:.0f})", flush=True)
    return {"shape": shape, "tool": tool, "error": f"not run: past --deadline-s {args.deadline_s:.0f}",
            "elapsed_s": 0.0}


def _figures(row: dict, common_tokens: int | None, params: int | None, peak_gflops: float) -> dict:
    """Tokens/s on the common token count (None: the tool's own) and the share of the measured bf16 peak it
    is (LoRA: 4 x params FLOP a token)."""
    if "error" in row or not row.get("train_seconds"):
        return {}
    common_tokens = common_tokens or row["tokens"]
    tps = common_tokens / row["train_seconds"]
    share = FLOP_PER_TOKEN["lora"] * (params or 0) * tps / (peak_gflops * 1e9)
    return {"common_tokens": common_tokens, "tokens_per_second": round(tps, 1), "peak_share": round(share, 5)}


def run_worker(tool: str, shape: str, model_dir: Path, rows_file: Path, args, started: float) -> dict:
    """One worker in a fresh process; its result, or {"error": ...} when it failed or ran out of time."""
    cmd = [sys.executable, __file__, "--worker", tool, "--shape", shape, "--model-dir", str(model_dir),
           "--rows-file", str(rows_file), "--tokenizer", str(args.tokenizer)] + [f"--set={o}" for o in args.overrides]
    timeout = None if args.deadline_s is None else max(30.0, args.deadline_s + 60 - (time.perf_counter() - started))
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "elapsed_s": round(time.perf_counter() - t0, 1)}
    elapsed = round(time.perf_counter() - t0, 1)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"{shape} {tool} FAILED (exit {done.returncode}):\n{done.stderr[-3000:]}", flush=True)
        return {"error": done.stderr[-3000:] or f"exit {done.returncode}", "elapsed_s": elapsed}
    return {**json.loads(lines[-1][len("RESULT "):]), "elapsed_s": elapsed}


def prepare_rows(shape: Shape, rows: int, work: Path, tokenizer: Path) -> Path:
    """The training rows every tool of `shape` trains on, as tunesmith prepares them, and their token count.

    Cached per (row count, long rows, max_length): shapes with the same settings share one file.
    """
    key = f"rows-{rows}-{'long' if shape.long_rows else 'short'}-{shape.max_length}"
    out = work / f"{key}.json"
    if out.is_file():
        return out
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare_data

    raw = rows + rows // 4 + 48  # room for the validation and test splits and cleaning
    config = write_project(work / key, raw, shape.max_length)
    splits = prepare_data(load_config(config))
    train = long_rows(splits.train, rows, shape.max_length) if shape.long_rows else splits.train[:rows]
    payload = {"config": str(config), "labels": splits.labels, "train": [e.to_json() for e in train],
               "validation": [e.to_json() for e in splits.validation[:8]],
               # Long rows are cut by tunesmith to its own budget, and only tunesmith trains on them: its count.
               "tokens": None if shape.long_rows else common_tokens(tokenizer, config, splits.labels, train)}
    out.write_text(json.dumps(payload))
    print(f"rows: {len(train)} training rows ({key}), {payload['tokens'] or 'tunesmith-counted'} tokens", flush=True)
    return out


def write_project(folder: Path, raw_rows: int, max_length: int) -> Path:
    """The quickstart project (task, instruction, LoRA, learning rate) on `raw_rows` BANKING77 rows, batch 16,
    one epoch. The rows come from intents spread over all 77, at least 16 rows each, so that every split
    has rows of each intent (all 77 from 1,232 rows up).
    Its extra evaluation suites are left out (only training is measured), and so is cleaning: the rows
    are BANKING77's own, and the GPU machine has neither semantic deduplication's embedding model nor
    cleanlab."""
    import yaml

    folder.mkdir(parents=True)
    by_intent: dict[str, list[dict]] = {}
    with BANKING77.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_intent.setdefault(row["category"], []).append(row)
    intents = list(by_intent)
    k = min(len(intents), max(2, raw_rows // 16))
    chosen = [by_intent[i] for i in intents[:: len(intents) // k][:k]]
    rows = [r for group in zip(*chosen) for r in group][:raw_rows]  # round robin over the chosen intents
    with (folder / "train.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    project = yaml.safe_load(PROJECT.read_text())
    project.pop("benchmarks", None)
    project["data"] = {"train": "train.csv", "validation": 0.1, "test": 0.05, "clean": {"enabled": False}}
    project["task"]["max_length"] = max_length
    project["train"].update(batch_size=16, epochs=1)
    config = folder / "project.yaml"
    config.write_text(yaml.safe_dump(project))
    return config


def long_rows(train: list, rows: int, max_length: int) -> list:
    """`rows` rows of more than `max_length` tokens' worth of text: consecutive messages joined (wrapping
    around the training rows), answered with the last one's label. tunesmith then cuts each prompt to
    task.max_length tokens (its oldest tokens go), so every row is a full task.max_length long."""
    out, at = [], 0
    for _ in range(rows):
        parts, chars = [], 0
        while chars < 6 * max_length:  # ~4 characters a token: always over the budget
            parts.append(train[at % len(train)])
            chars += len(parts[-1].input) + 1
            at += 1
        out.append(dataclasses.replace(parts[-1], input=" ".join(p.input for p in parts)))
    return out


def common_tokens(tokenizer_path: Path, config: Path, labels: list[str], train: list) -> int:
    """Prompt + answer tokens of the rows as the chat template renders them, each capped at task.max_length:
    the one count every tool's tokens/s is computed on."""
    from transformers import AutoTokenizer

    from tunesmith.config import load_config
    from tunesmith.tasks.prompts import build_format

    project = load_config(config)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    fmt = build_format(project.task, labels, tokenizer)
    total = 0
    for ex in train:
        messages = fmt.messages(ex) + [{"role": "assistant", "content": ex.target}]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        total += min(len(ids), project.task.max_length)
    return total


# ----------------------------------------------------------------------------------------------- workers


def build_worker(args) -> dict:
    """Random weights of the shape, saved as safetensors with the tokenizer beside them (bf16 on a GPU)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32  # bf16 halves the 8b save; CPU runs keep fp32
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, dtype=dtype,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **SHAPES[args.shape].dims)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # built in its saved precision: no fp32 copy of the 8b shape first
    with torch.device("cuda" if cuda else "cpu"):  # initialised where it is fastest
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.model_dir)
    tokenizer.save_pretrained(args.model_dir)
    return {"params": params, "dtype": str(dtype), "build_seconds": round(time.perf_counter() - started, 1)}


def load_rows(args):
    """(project, labels, train rows, validation rows) from the rows file."""
    from tunesmith.config import load_config
    from tunesmith.data.examples import Example

    rows = json.loads(Path(args.rows_file).read_text())
    project = load_config(rows["config"])
    train = [Example.from_json(r) for r in rows["train"]]
    return project, rows["labels"], train, [Example.from_json(r) for r in rows["validation"]]


def tunesmith_worker(args) -> dict:
    import yaml

    from tunesmith import hardware
    from tunesmith.config import derive
    from tunesmith.models.load import load_tokenizer
    from tunesmith.tasks.prompts import build_format
    from tunesmith.train.trainer import fit, load_base

    project, labels, train, val = load_rows(args)
    shape = SHAPES[args.shape]
    settings = {"eval_every": 10**6, "early_stopping": False, "trackers": [], "quantize": shape.quantize,
                **shape.tunesmith}
    for item in args.overrides:  # --set train.KEY=VALUE
        key, _, value = item.partition("=")
        settings[key.removeprefix("train.")] = yaml.safe_load(value)
    cfg = derive(project.train, settings)
    path = Path(args.model_dir)
    tokenizer = load_tokenizer(path)
    fmt = build_format(project.task, labels, tokenizer)
    model = load_base(path, cfg)  # quantized straight from the checkpoint under train.quantize, else as loaded
    started = time.perf_counter()
    result = fit(model, tokenizer, fmt, train, val, cfg, project.objective.metric, progress=False)
    stats = result.stats
    return {"rows": len(train), "tokens": stats.train_tokens, "train_seconds": stats.train_seconds,
            "fit_wall_seconds": round(time.perf_counter() - started, 2),
            "own_tokens_per_second": stats.tokens_per_second, "gpu_peak_mb": stats.gpu_peak_mb,
            "gpu_reserved_mb": _reserved_mb(), "peak_rss_mb": hardware.peak_rss_mb(),
            "settings": {k: v for k, v in cfg.model_dump(mode="json").items() if k in settings or k in
                         ("batch_size", "epochs", "gradient_checkpointing", "packing", "batch_tokens")},
            "precision": stats.precision, "gradient_checkpointing_used": stats.gradient_checkpointing,
            "preflight": result.preflight}


def trl_worker(args, packing: bool = False) -> dict:
    """TRL's SFTTrainer with its defaults plus bf16 (on a GPU), the project's LoRA, batch, epochs and rate."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunesmith import hardware
    from tunesmith.tasks.prompts import build_format

    project, labels, train, _ = load_rows(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    fmt = build_format(project.task, labels, tokenizer)
    # Conversational prompt-completion: TRL applies the same chat template and trains on the completion.
    data = Dataset.from_list([{"prompt": fmt.messages(e), "completion": [{"role": "assistant", "content": e.target}]}
                              for e in train])
    cfg, cuda = project.train, torch.cuda.is_available()
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    sft = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-gpu-bench-"), num_train_epochs=cfg.epochs,
                    per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, report_to=[],
                    save_strategy="no", logging_steps=10**6, use_cpu=not cuda, bf16=cuda, seed=cfg.seed,
                    max_length=project.task.max_length, packing=packing, disable_tqdm=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # as tunesmith's fit: the peak from the model's load on
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(args.model_dir), args=sft, train_dataset=data,
                         processing_class=tokenizer, peft_config=lora)
    tokens = int(sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * cfg.epochs)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"rows": len(train), "tokens": tokens, "train_seconds": round(seconds, 3), "fit_wall_seconds": seconds,
            "own_tokens_per_second": hardware.throughput(tokens, seconds), "gpu_peak_mb": gpu_peak_mb(),
            "gpu_reserved_mb": _reserved_mb(), "peak_rss_mb": hardware.peak_rss_mb(),
            "settings": {"bf16": bool(sft.bf16), "packing": packing, "gradient_checkpointing":
                         bool(sft.gradient_checkpointing), "padding_free": bool(getattr(trainer, "padding_free", 0))}}


def _reserved_mb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_reserved() / 2**20, 1) if torch.cuda.is_available() else None


WORKERS = {"build": build_worker, "tunesmith": tunesmith_worker, "trl": trl_worker,
           "trl-packing": lambda args: trl_worker(args, packing=True)}


# ----------------------------------------------------------------------------------------------- report


def print_run(row: dict) -> None:
    if "error" in row:
        print(f"{row['shape']:10} {row['tool']:11} FAILED after {row['elapsed_s']:.0f} s", flush=True)
        return
    gpu = row.get("gpu_peak_mb")
    print(f"{row['shape']:10} {row['tool']:11} rows {row['rows']:5} tokens/s {row['tokens_per_second']:9.1f} "
          f"(own count {row['own_tokens_per_second']:9.1f}) train {row['train_seconds']:7.1f} s  "
          f"GPU peak {'n/a' if gpu is None else f'{gpu:.0f} MB':>9}  {100 * row['peak_share']:6.2f}% of bf16 peak  "
          f"elapsed {row['elapsed_s']:.0f} s", flush=True)


def summarise(runs: list[dict], peak_gflops: float) -> dict:
    """Print the table, the ratios tunesmith/TRL per shape and PASS/FAIL on issue 18's targets."""
    print(f"\nbf16 matmul peak measured: {peak_gflops:.0f} GFLOP/s")
    print(f"{'shape':10} {'tool':11} {'tokens/s':>9} {'GPU MB':>8} {'% peak':>7} {'elapsed s':>9}")
    ok = {(r["shape"], r["tool"]): r for r in runs if "error" not in r}
    for r in runs:
        if "error" in r:
            last = (r["error"].strip().splitlines() or ["?"])[-1]
            print(f"{r['shape']:10} {r['tool']:11} {'' if last.startswith('not run') else 'FAILED: '}{last}")
        else:
            print(f"{r['shape']:10} {r['tool']:11} {r['tokens_per_second']:9.1f} {_mb(r):>8} "
                  f"{100 * r['peak_share']:6.2f}% {r['elapsed_s']:9.0f}")
    verdicts = {}
    for shape in dict.fromkeys(r["shape"] for r in runs):
        verdicts.update(_shape_verdicts(shape, ok))
    for name, v in verdicts.items():
        print(f"{name}: {v['value']} (target {v['target']}) {v['verdict']}")
    return verdicts


def _mb(row: dict) -> str:
    return "n/a" if row.get("gpu_peak_mb") is None else f"{row['gpu_peak_mb']:.0f}"


def _shape_verdicts(shape: str, ok: dict) -> dict:
    ts = ok.get((shape, "tunesmith"))
    out = {}
    for tool, target in (("trl", TARGET_SPEED_DEFAULT), ("trl-packing", TARGET_SPEED_PACKING)):
        other = ok.get((shape, tool))
        if ts and other:
            ratio = ts["tokens_per_second"] / other["tokens_per_second"]
            out[f"{shape} tokens/s tunesmith/{tool}"] = _verdict(f"x{ratio:.2f}", f">= x{target}", ratio >= target,
                                                                 shape == "1b")
    trl = ok.get((shape, "trl"))
    if ts and trl and ts.get("gpu_peak_mb") and trl.get("gpu_peak_mb"):
        ratio = ts["gpu_peak_mb"] / trl["gpu_peak_mb"]
        out[f"{shape} GPU peak tunesmith/trl"] = _verdict(f"x{ratio:.2f}", "<= x1.00", ratio <= 1.0, shape == "1b")
    if ts and ts.get("gpu_peak_mb") and SHAPES[shape].quantize != "none":
        mb = ts["gpu_peak_mb"]
        passed = mb * 2**20 <= TARGET_8B_BYTES and ts["tokens_per_second"] > 0
        out[f"{shape} QLoRA GPU peak"] = _verdict(f"{mb:.0f} MB", f"<= {TARGET_8B_BYTES / 2**20:.0f} MB (16 GB)",
                                                  passed, shape == "8b")
    for name in TARGETED.get(shape, ()):  # a target whose runs failed, were not run or had no GPU
        out.setdefault(name, {"value": "not measured", "target": "", "verdict": "NOT MEASURED"})
    return out


def _verdict(value: str, target: str, passed: bool, targeted: bool) -> dict:
    """A figure against a target; only the issue's own shapes (1b, 8b) get PASS/FAIL, others are informative."""
    verdict = ("PASS" if passed else "FAIL") if targeted else "(no target for this shape)"
    return {"value": value, "target": target, "verdict": verdict}


def write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        Path(path).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
