"""Issue 21, "serving adapters at scale": `serve --engine vllm` serves a LoRA run as an adapter on its
base (`vllm serve BASE --enable-lora --lora-modules '{"name": NAME, "path": RUN/model}'`), several
sidecars share one upstream by model name (`--upstream-model`), `--print-vllm-command` prints the
shared command for runs of one base, and what vLLM cannot serve as a LoRA module is refused before
anything starts.

vLLM needs a GPU: the started engine is a stand-in `vllm` executable (tests/fake_vllm.py) that records
its argv, parses `--lora-modules` by vLLM's rule and lists its models as vLLM does (base first, then the
LoRA modules);
the shared upstream is a stand-in for vLLM's per-request adapter routing, forwarding each request by
its `model` to tunesmith's own server running that run (or the bare base), so every answer is a real
answer of that adapter."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conftest import GEN_PROJECT, answers, free_port, make_texts, serve_process, start_server, wait_until, write_jsonl
from fake_vllm import install as install_fake_vllm
from fake_vllm import parse_lora_module
from tunesmith.cli import app as cli
from tunesmith.config import ServeConfig
from tunesmith.errors import InputError, RunDirError
from tunesmith.serve.app import create_app
from tunesmith.serve.remote import lora_rank_bound, vllm_lora_command
from tunesmith.serve.server import shared_vllm_command, vllm_model
from tunesmith.serve.service import load_service

runner = CliRunner()
PROMPTS = ["my red card", "where is the blue bank", "green money please", "help today now"]
LORA_PROJECT = GEN_PROJECT.replace("  batch_size: 4\n", "  batch_size: 4\n  learning_rate: 0.05\n")
def _train(folder: Path, name: str, model: Path, seed: int, steps: int = 6) -> Path:
    rows = [{"prompt": r["text"], "completion": r["label"] + " " + name} for r in make_texts(24, seed)]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:3])
    (folder / "project.yaml").write_text(LORA_PROJECT.format(name=name, model=model, method="lora", steps=steps,
                                                                new_tokens=4), encoding="utf-8")
    result = runner.invoke(cli, ["run", str(folder / "project.yaml"), "--out", str(folder / "run"), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    _distinct_adapter(folder / "run" / "model" / "adapter_model.safetensors", seed)
    return folder / "run"


def _distinct_adapter(path: Path, seed: int) -> None:
    """Random B matrices in the saved adapter, so its greedy answers differ from the base's and from the
    other adapter's whatever a few tiny training steps happened to learn (the test is about routing: a
    request sent to the wrong model has to show)."""
    import torch
    from safetensors.torch import load_file, save_file

    weights, generator = load_file(path), torch.Generator().manual_seed(seed)
    for key in [k for k in weights if "lora_B" in k]:
        weights[key] = torch.randn(weights[key].shape, generator=generator) * 0.5
    save_file(weights, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def lora_a(tmp_path_factory, tiny_model) -> Path:
    return _train(tmp_path_factory.mktemp("lora-a"), "adapta", tiny_model, 1)


@pytest.fixture(scope="module")
def lora_b(tmp_path_factory, tiny_model) -> Path:
    return _train(tmp_path_factory.mktemp("lora-b"), "adaptb", tiny_model, 2)


@pytest.fixture()
def fake_vllm(tmp_path) -> tuple[dict, Path]:
    """(environment with the stand-in `vllm` (tests/fake_vllm.py) first on PATH, the log it appends to)."""
    bin_dir, log = install_fake_vllm(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_VLLM_LOG": str(log)}
    env.pop("TUNESMITH_API_KEYS", None)
    return env, log


def _rows(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


# ---- one run: the adapter on its base ---------------------------------------------------------------

def test_a_lora_run_starts_vllm_with_its_adapter_on_its_base(lora_a, tiny_model, fake_vllm, tmp_path):
    """No merged variant: vLLM gets the base checkpoint, --enable-lora and the run's adapter as a LoRA
    module named after the run, a rank bound that holds r; the key only in its environment; the
    sidecar requests the adapter by name although /v1/models lists the base first. The run lives in a
    folder whose name holds '=' and ',' (as `runs/lr=1e-4/` does), which vLLM's NAME=PATH form breaks on."""
    env, log = fake_vllm
    run = tmp_path / "lr=1e-4,seed=1" / "run"
    shutil.copytree(lora_a, run)
    port = free_port()
    proc = serve_process([str(run), "--engine", "vllm", "--port", str(port)], env, tmp_path / "err.txt")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(url) or proc.poll() is not None, what="the sidecar")
        assert proc.poll() is None, (tmp_path / "err.txt").read_text()
        started = _rows(log)[0]
        argv, key = started["argv"], started["key"]
        assert argv[:2] == ["serve", str(Path(tiny_model).resolve())] and "--enable-lora" in argv
        module = argv[argv.index("--lora-modules") + 1]
        assert json.loads(module) == {"name": "adapta", "path": str((run / "model").resolve())}
        assert started["modules"] == [["adapta", str((run / "model").resolve())]]  # as vLLM parses it
        rank = json.loads((run / "model" / "adapter_config.json").read_text())["r"]
        assert int(argv[argv.index("--max-lora-rank") + 1]) >= rank and argv[argv.index("--max-loras") + 1] == "1"
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        assert len(key) >= 32 and key not in " ".join(argv) and "--api-key" not in argv
        answer = httpx.post(url + "/v1/completions", json={"prompt": "my card", "max_tokens": 2}, timeout=30)
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == " fake answer"
        assert [r["model"] for r in _rows(log) if "model" in r] == ["adapta"]
    finally:
        _stop(proc)
    assert proc.returncode == 0


def test_whole_weights_win_unless_lora_is_asked_for(lora_a, tiny_model, tmp_path):
    """The rule: a merged variant (whole weights, no LoRA kernels) is what vLLM loads; --lora loads the
    adapter on its base instead, so the run can share a vLLM server with other fine-tunes of that base."""
    copy = tmp_path / "run"
    shutil.copytree(lora_a, copy)
    assert vllm_model(copy).adapter == (copy / "model").resolve()  # no whole weights: the adapter
    result = runner.invoke(cli, ["optimize", str(copy), "--variants", "merged", "--quiet"])
    assert result.exit_code == 0, result.output
    merged = vllm_model(copy)
    assert merged.model == copy / "variants" / "merged" and merged.adapter is None
    forced = vllm_model(copy, lora=True)
    assert forced.model == Path(tiny_model).resolve() and forced.adapter == (copy / "model").resolve()
    assert forced.name == "adapta" and forced.rank == 16
    out = runner.invoke(cli, ["serve", str(copy), "--lora", "--engine", "vllm", "--upstream", "http://127.0.0.1:9"])
    assert out.exit_code == 2 and "--lora" in _error_line(out.output)
    out = runner.invoke(cli, ["serve", str(copy), "--lora"])
    assert out.exit_code == 2 and "--lora goes with --engine vllm" in _error_line(out.output)


def test_rank_bounds_and_the_lora_command():
    assert [lora_rank_bound(r) for r in (1, 8, 9, 16, 64, 65, 300, 512)] == [8, 8, 16, 16, 64, 128, 320, 512]
    with pytest.raises(ValueError):
        lora_rank_bound(513)
    cmd = vllm_lora_command(Path("/base"), 9001, {"a": Path("/r/a/model"), "b": Path("/r/b/model")}, 20)
    assert cmd[:3] == ["vllm", "serve", "/base"] and cmd[cmd.index("--max-lora-rank") + 1] == "32"
    i = cmd.index("--lora-modules")
    assert [json.loads(m) for m in cmd[i + 1:i + 3]] == [{"name": "a", "path": "/r/a/model"},
                                                       {"name": "b", "path": "/r/b/model"}]
    assert cmd[cmd.index("--max-loras") + 1] == "2"


@pytest.mark.parametrize("path", ["/runs/lr=1e-4/model", "/runs/a,b/model", "/runs/x=1,y=2/model",
                                  '/runs/q"uote\\é=/model', "/runs/plain/model"])
def test_every_adapter_path_reaches_vllm_as_it_is(path):
    """Each --lora-modules item parses, by vLLM's own rule, to the adapter's name and exact path,
    whatever characters the path holds (NAME=PATH does not survive '=' in the path)."""
    cmd = vllm_lora_command(Path("/base"), 9001, {"a-v1": Path(path), "b": Path("/runs/lr=3e-4/model")}, 8)
    i = cmd.index("--lora-modules")
    assert [parse_lora_module(item) for item in cmd[i + 1:i + 3]] == [("a-v1", path), ("b", "/runs/lr=3e-4/model")]
    assert shlex.split(shlex.join(cmd)) == cmd  # the printed command gives vLLM the same items


# ---- several runs sharing one upstream ------------------------------------------------------------

def _multi_lora_upstream(routes: dict[str, str], seen: list):
    """A stand-in for vLLM serving LoRA modules: /v1/models lists `routes`' names (the base first) and
    each completion goes to the server running the model its `model` field names."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model"} for name in routes]})

    async def completions(request):
        body = await request.json()
        seen.append(body.get("model"))
        if body.get("model") not in routes:
            return JSONResponse({"error": {"message": "model not found"}}, status_code=404)
        async with httpx.AsyncClient(timeout=120) as client:
            r = await client.post(routes[body["model"]] + "/v1/completions", json=body)
        return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))
    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])


def _own_answers(run, tmp_path, name: str) -> list[str]:
    """The run's answers from tunesmith's built-in engine, asked directly."""
    with TestClient(create_app(load_service(run), ServeConfig(max_tokens=64), [], tmp_path / f"{name}.db")) as c:
        return [c.post("/v1/completions", json={"prompt": p, "max_tokens": 6}).json()["choices"][0]["text"]
                for p in PROMPTS]


def test_sidecars_share_one_upstream_and_answer_as_their_own_adapter(lora_a, lora_b, tiny_model, tmp_path):
    """Two sidecars in front of one multi-model upstream: A asks for its module by --upstream-model
    (named `a-v1` there, as `--print-vllm-command a-v1=RUN_A` names it), B by default under its run's
    name; each answers exactly what its own run answers, which here is not what the base answers."""
    servers = {name: start_server(create_app(load_service(target), ServeConfig(max_tokens=64), [],
                                             tmp_path / f"up-{name}.db"))
               for name, target in (("base", tiny_model), ("a-v1", lora_a), ("adaptb", lora_b))}
    seen: list = []
    router, stop_router = start_server(_multi_lora_upstream({n: url for n, (url, _) in servers.items()}, seen))
    env = {k: v for k, v in os.environ.items() if k != "TUNESMITH_API_KEYS"}
    ports = free_port(), free_port()
    procs = [serve_process([str(lora_a), "--engine", "vllm", "--upstream", router, "--upstream-model", "a-v1",
                       "--port", str(ports[0])], env, tmp_path / "a.txt"),
             serve_process([str(lora_b), "--engine", "vllm", "--upstream", router, "--port", str(ports[1])], env,
                      tmp_path / "b.txt")]
    try:
        got = {}
        for proc, port, err, name in zip(procs, ports, ("a.txt", "b.txt"), ("a", "b")):
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: answers(url) or proc.poll() is not None, what="a sidecar")
            assert proc.poll() is None, (tmp_path / err).read_text()
            got[name] = [httpx.post(url + "/v1/completions", json={"prompt": p, "max_tokens": 6}, timeout=120)
                         .json()["choices"][0]["text"] for p in PROMPTS]
    finally:
        for proc in procs:
            _stop(proc)
        stop_router()
        for _, stop in servers.values():
            stop()
    own_a, own_b = _own_answers(lora_a, tmp_path, "own-a"), _own_answers(lora_b, tmp_path, "own-b")
    base = _own_answers(tiny_model, tmp_path, "own-base")
    assert got["a"] == own_a and got["b"] == own_b
    assert own_a != base and own_b != base  # asking the upstream for the wrong model would show
    assert set(seen) == {"a-v1", "adaptb"}


def test_an_upstream_that_does_not_list_the_model_is_refused(lora_a, tmp_path):
    seen: list = []
    router, stop = start_server(_multi_lora_upstream({"base": "http://127.0.0.1:9", "other": "http://127.0.0.1:9"},
                                                     seen))
    try:
        for extra, missing in (([], "adapta"), (["--upstream-model", "nope"], "nope")):
            out = runner.invoke(cli, ["serve", str(lora_a), "--engine", "vllm", "--upstream", router,
                                      "--port", str(free_port()), *extra], env={"TUNESMITH_API_KEYS": None})
            line = _error_line(out.output)
            assert out.exit_code == 2 and f"does not serve '{missing}'" in line and "--upstream-model" in line
            assert "'base', 'other'" in line
        out = runner.invoke(cli, ["serve", str(lora_a), "--engine", "vllm", "--upstream-model", "x"])
        assert out.exit_code == 2 and "--upstream-model goes with --upstream" in _error_line(out.output)
    finally:
        stop()
    assert seen == []  # nothing was requested


# ---- the shared command ---------------------------------------------------------------------------

def test_print_vllm_command_for_runs_of_one_base(lora_a, lora_b, tiny_model):
    shared = shared_vllm_command([str(lora_a), f"b-v2={lora_b}"], port=8100)
    cmd = shared.command
    assert cmd[:3] == ["vllm", "serve", str(Path(tiny_model).resolve())] and "--enable-lora" in cmd
    i = cmd.index("--lora-modules")
    assert [parse_lora_module(m) for m in cmd[i + 1:i + 3]] == [("adapta", str((lora_a / "model").resolve())),
                                                              ("b-v2", str((lora_b / "model").resolve()))]
    assert cmd[cmd.index("--max-loras") + 1] == "2" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--api-key" not in cmd
    assert "--upstream-model b-v2" in shared.sidecars[1] and "--upstream-api-key-env VLLM_API_KEY" in shared.sidecars[1]
    out = runner.invoke(cli, ["serve", "--print-vllm-command", str(lora_a), f"b-v2={lora_b}", "--port", "8100"])
    assert out.exit_code == 0, out.output
    assert shlex.split(out.stdout.strip().splitlines()[-1]) == cmd
    twice = runner.invoke(cli, ["serve", "--print-vllm-command", str(lora_a), str(lora_a)])
    assert twice.exit_code == 2 and "NAME=RUN_DIR" in _error_line(twice.output)
    several = runner.invoke(cli, ["serve", str(lora_a), str(lora_b)])
    assert several.exit_code == 2 and "--print-vllm-command" in _error_line(several.output)


@pytest.mark.parametrize("extra,flag", [(["--engine", "vllm"], "--engine"), (["--engine", "builtin"], "--engine"),
                                        (["--lora"], "--lora"), (["--upstream", "http://127.0.0.1:9"], "--upstream"),
                                        (["--upstream-model", "a"], "--upstream-model"),
                                        (["--upstream-api-key-env", "K"], "--upstream-api-key-env"),
                                        (["--variant", "merged"], "--variant"), (["--registry", "r"], "--registry"),
                                        (["--api-keys-file", "keys.txt"], "--api-keys-file"),
                                        (["--insecure-no-auth"], "--insecure-no-auth")])
def test_print_vllm_command_refuses_options_it_would_ignore(lora_a, extra, flag):
    out = runner.invoke(cli, ["serve", "--print-vllm-command", str(lora_a), *extra])
    assert out.exit_code == 2 and "vllm serve" not in out.output  # no command is printed
    assert _error_line(out.output).startswith(f"error: {flag} does not go with --print-vllm-command, {flag}")


def test_a_full_fine_tune_is_refused_with_a_hint_that_fits_the_command(lora_a, tmp_path):
    """A run with no adapter: --print-vllm-command (no --lora given) points at serving it on its own;
    `serve --engine vllm --lora` says to drop --lora."""
    run = tmp_path / "run"
    shutil.copytree(lora_a, run)
    meta = json.loads((run / "model" / "tunesmith.json").read_text())
    (run / "model" / "tunesmith.json").write_text(json.dumps({**meta, "method": "full", "kind": "full"}))
    out = runner.invoke(cli, ["serve", "--print-vllm-command", str(run)])
    line = _error_line(out.output)
    assert out.exit_code == 2 and "a full run has no LoRA adapter to serve" in line
    assert "--lora" not in line and "tunesmith serve RUN_DIR --engine vllm" in line
    with pytest.raises(RunDirError) as e:
        vllm_model(run, lora=True)
    assert e.value.hint.startswith("drop --lora")


def test_runs_of_different_bases_do_not_share_a_command(lora_a, tiny_plain_model, tmp_path):
    other = _train(tmp_path, "otherbase", tiny_plain_model, 3, steps=1)
    with pytest.raises(InputError, match="do not share one base model") as e:
        shared_vllm_command([str(lora_a), str(other)])
    assert str(Path(tiny_plain_model).resolve()) in e.value.what
    out = runner.invoke(cli, ["serve", "--print-vllm-command", str(lora_a), str(other)])
    assert out.exit_code == 2 and "vllm serve" not in out.output  # no command is printed
    assert "do not share one base model" in _error_line(out.output)


# ---- what vLLM cannot serve as a LoRA module ----------------------------------------------------

def _peft_config(kind: str):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    return {"prompt_tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
            "prefix_tuning": PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
            "ia3": IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                             feedforward_modules=["down_proj"]),
            "dora": LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj"], use_dora=True),
            "modules_to_save": LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj"],
                                          modules_to_save=["lm_head"]),
            "embeddings": LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "embed_tokens"]),
            "bias": LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj"], bias="lora_only")}[kind]


@pytest.mark.parametrize("kind,says", [("prompt_tuning", "this one is PROMPT_TUNING"),
                                       ("prefix_tuning", "this one is PREFIX_TUNING"), ("ia3", "this one is IA3"),
                                       ("dora", "DoRA"), ("modules_to_save", "modules_to_save"),
                                       ("embeddings", "embed_tokens"),
                                       ("bias", "trained biases")])
def test_adapters_vllm_cannot_serve_are_refused(lora_a, tiny_model, fake_vllm, tmp_path, kind, says):
    """A real PEFT adapter of each kind, in place of the run's: exit 2 before vLLM starts, the error
    naming the adapter's file and what vLLM cannot load; the shared command refuses it too."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    shutil.copytree(lora_a, run)
    for old in ("adapter_config.json", "adapter_model.safetensors"):
        (run / "model" / old).unlink()
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), _peft_config(kind)).save_pretrained(run / "model")
    env, log = fake_vllm
    out = runner.invoke(cli, ["serve", str(run), "--engine", "vllm", "--port", str(free_port())], env=env)
    line = _error_line(out.output)
    assert out.exit_code == 2 and says in line and str(run / "model") in line, line
    assert "--lora" not in line  # not given, so not to be dropped
    assert _rows(log) == []  # nothing started
    with pytest.raises(RunDirError, match="vLLM") as e:
        shared_vllm_command([str(lora_a), str(run)])
    assert "--lora" not in e.value.hint
    if "merged" in e.value.hint:
        assert "not in --print-vllm-command" in e.value.hint
    with pytest.raises(RunDirError) as e:
        vllm_model(run, lora=True)
    assert "built-in engine" in e.value.hint or e.value.hint.endswith("(and drop --lora)")


def test_a_base_vllm_cannot_load_is_refused(lora_a, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_a, run)
    config_only = tmp_path / "base"
    config_only.mkdir()
    (config_only / "config.json").write_text("{}", encoding="utf-8")
    meta = json.loads((run / "model" / "tunesmith.json").read_text())
    (run / "model" / "tunesmith.json").write_text(json.dumps({**meta, "base_model_path": str(config_only)}))
    with pytest.raises(RunDirError, match="not a checkpoint folder vLLM loads") as e:
        vllm_model(run)
    assert e.value.where.endswith("tunesmith.json") and "merged" in e.value.hint
