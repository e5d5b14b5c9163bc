"""Issue 16, items 6, 8 and the serve inputs of 13: the sidecar's upstream key, a started vLLM
that needs a key and is stopped with tunesmith, invalid upstream answers as 502; no open server
off loopback, the Host check on loopback, key files; --port out of range or taken.

The engine tests use a stand-in `vllm` executable (tests/fake_vllm.py: a small HTTP server speaking the
two OpenAI routes the sidecar calls and requiring VLLM_API_KEY as vLLM does), started by tunesmith itself
through the real `serve --engine vllm` path; vLLM needs a GPU."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conftest import GEN_PROJECT, answers, make_texts, serve_process, wait_until, write_jsonl
from fake_vllm import install as install_fake_vllm
from tunesmith.cli import app as cli
from tunesmith.config import ServeConfig
from tunesmith.errors import EngineError, InputError
from tunesmith.serve.app import create_app
from tunesmith.serve.auth import load_keys
from tunesmith.serve.hosts import HostCheck, host_name, is_loopback, loopback_guard
from tunesmith.serve.remote import RemoteService, parse_completion, start_engine, stop_engine
from tunesmith.serve.server import bind_listener

runner = CliRunner()
LONG_KEY = "k" * 15 + "#with-a-hash"  # 27 characters, '#' inside: a key, not a comment
@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model) -> Path:
    """A fully fine-tuned generation run: whole weights, as vLLM needs."""
    folder = tmp_path_factory.mktemp("sidecar-full")
    rows = [{"prompt": r["text"], "completion": r["label"]} for r in make_texts(16, 3)]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:3])
    project = GEN_PROJECT.format(name="fullgen", model=tiny_model, method="full", steps=1, new_tokens=2)
    (folder / "project.yaml").write_text(project, encoding="utf-8")
    result = runner.invoke(cli, ["run", str(folder / "project.yaml"), "--out", str(folder / "run"), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    return folder / "run"


@pytest.fixture()
def fake_vllm(tmp_path) -> tuple[Path, Path]:
    """(bin folder holding the stand-in `vllm` of tests/fake_vllm.py, the log it appends JSON rows to)."""
    return install_fake_vllm(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _kill_group(pid: int | None) -> None:
    """SIGKILL what is left of a process group the test started (a no-op once it is gone)."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # not a group leader (the code under test did not make it one)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM, as a service manager stops a server; SIGKILL if it has not exited within a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _start_uvicorn(app):
    """A real uvicorn server on a loopback port in a thread: (url, stop)."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the upstream to start")

    def stop():
        server.should_exit = True
        thread.join(10)
    return f"http://127.0.0.1:{port}", stop


# ---- item 6: the sidecar and its engine -------------------------------------------------------

def test_item6_started_vllm_needs_a_fresh_key_and_stops_when_tunesmith_is_terminated(full_run, fake_vllm, tmp_path):
    """`serve --engine vllm` starts the engine with a random key in VLLM_API_KEY (not argv), sends it
    upstream, answers through it; the loopback sidecar refuses a foreign Host; SIGTERM to tunesmith
    stops the engine too (before the fix uvicorn re-raised SIGTERM and the engine was orphaned)."""
    bin_dir, log = fake_vllm
    port = _free_port()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_VLLM_LOG": str(log)}
    env.pop("TUNESMITH_API_KEYS", None)
    proc = serve_process([str(full_run), "--engine", "vllm", "--port", str(port)], env, tmp_path / "err.txt")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(url) or proc.poll() is not None, 180, "the sidecar")
        assert proc.poll() is None, (tmp_path / "err.txt").read_text()
        started = _rows(log)[0]
        key = started["key"]
        assert len(key) >= 32 and key not in " ".join(started["argv"])
        assert started["argv"][started["argv"].index("--host") + 1] == "127.0.0.1"
        answer = httpx.post(url + "/v1/completions", json={"prompt": "my card", "max_tokens": 2}, timeout=30)
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == " fake answer"
        sent = [r["authorization"] for r in _rows(log) if r.get("path") == "/v1/completions"]
        assert sent == [f"Bearer {key}"]
        rebound = httpx.get(url + "/v1/models", headers={"Host": f"evil.example:{port}"}, timeout=10)
        assert rebound.status_code == 421 and "localhost" in rebound.json()["error"]["message"]
        assert httpx.get(url + "/v1/models", headers={"Host": f"localhost:{port}"}, timeout=10).status_code == 200
    finally:
        _terminate(proc)
        engine = _rows(log)[0]["pid"] if _rows(log) else None
        try:
            wait_until(lambda: engine is None or not _alive(engine), 10, "the engine to stop")
        finally:
            _kill_group(engine)  # nothing outlives the test, whatever it found
    assert proc.returncode == 0


def test_plain_serve_stops_on_sigterm_with_exit_0_and_no_error(full_run, tmp_path):
    """SIGTERM is how a service manager stops a server: exit 0 and no `error:` line (the CLI's SIGTERM
    handling, made for one-shot commands, must not turn it into `error: terminated`, exit 143)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "TUNESMITH_API_KEYS"}
    proc = serve_process([str(full_run), "--port", str(port)], env, tmp_path / "err.txt")
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}") or proc.poll() is not None, 180, "the server")
        assert proc.poll() is None, (tmp_path / "err.txt").read_text()
    finally:
        _terminate(proc)
    assert proc.returncode == 0 and "error:" not in (tmp_path / "err.txt").read_text()

def test_item6_engine_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    """stop_engine on a process group whose leader and worker both ignore SIGTERM: SIGTERM, wait
    the grace period, SIGKILL to the whole group; the key reaches the engine's environment."""
    pids = tmp_path / "pids.json"
    script = ("import json, os, signal, subprocess, sys, time\n"
              "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
              "worker = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
              f"open({str(pids)!r}, 'w').write(json.dumps([os.getpid(), worker.pid, os.environ['VLLM_API_KEY']]))\n"
              "time.sleep(600)\n")
    process = start_engine([sys.executable, "-c", script], "engine-key-0123456789")
    try:
        wait_until(lambda: pids.is_file() and pids.read_text().endswith("]"), 30, "the fake engine")
        leader, worker, key = json.loads(pids.read_text())
        assert key == "engine-key-0123456789" and leader == process.pid
        started = time.monotonic()
        stop_engine(process, grace=1.0)
        assert process.returncode == -signal.SIGKILL  # it ignored SIGTERM, so the grace period ran out
        assert time.monotonic() - started < 30
        wait_until(lambda: not _alive(worker), 10, "the worker to die")
    finally:
        _kill_group(process.pid)

    polite = start_engine([sys.executable, "-c", "import time; time.sleep(600)"], "engine-key-0123456789")
    stop_engine(polite, grace=30.0)
    assert polite.returncode == -signal.SIGTERM  # a cooperative engine stops on SIGTERM, no kill needed
    stop_engine(polite)  # stopping twice is harmless


def test_item6_engine_gets_sigterm_when_tunesmith_is_killed_outright(tmp_path):
    """SIGKILL (or the OOM killer) runs no `finally`; the engine still gets SIGTERM from the kernel
    (PR_SET_PDEATHSIG, armed by orphan_guard before it execs the engine) instead of keeping the GPU."""
    parent_script = ("import sys, time\n"
                     "from tunesmith.serve.remote import start_engine\n"
                     "p = start_engine([sys.executable, '-c', 'import time; time.sleep(600)'], "
                     "'engine-key-0123456789')\n"
                     "print(p.pid, flush=True)\n"
                     "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_script], stdout=subprocess.PIPE, text=True)
    engine = int(parent.stdout.readline())
    try:
        wait_until(lambda: "time.sleep(600)" in Path(f"/proc/{engine}/cmdline").read_text(errors="replace")
                    .replace("\0", " "), 30, "the engine to exec")
        parent.kill()
        parent.wait()
        wait_until(lambda: not _alive(engine), 20, "the engine to die with its parent")
    finally:
        _kill_group(engine)


def _bad_upstream(mode: dict):
    """An OpenAI-looking upstream whose /v1/completions answers whatever `mode["body"]` holds."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"data": [{"id": "bad"}]})

    async def completions(request):
        body = mode["body"]
        if isinstance(body, bytes):
            return Response(body, media_type="text/event-stream" if b"data:" in body else "application/json")
        return JSONResponse(body)
    return Starlette(routes=[Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"])])


def test_item6_invalid_upstream_answers_are_502_never_500(full_run, tmp_path):
    mode: dict = {}
    upstream, stop = _start_uvicorn(_bad_upstream(mode))
    remote = RemoteService("fullgen", full_run, full_run / "model", upstream)
    bad_bodies = [b"<html>gateway timeout</html>", b"", {"choices": []}, {"choices": [{"text": 7}]},
                  {"choices": "nope"}, {"choices": [{"text": "x"}], "usage": {"prompt_tokens": "3"}}, [1, 2]]
    try:
        with TestClient(create_app(remote, ServeConfig(max_tokens=8), None, tmp_path / "log.db")) as c:
            for body in bad_bodies:
                mode["body"] = body
                r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert r.status_code == 502, (body, r.status_code, r.text)
                assert r.json()["error"]["message"].startswith("upstream sent an invalid answer")
            mode["body"] = b"data: {not json\n\n"
            # Broken before its first piece, a stream can still be answered with a status: 502.
            streamed = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
            assert streamed.status_code == 502, streamed.text
            assert streamed.json()["error"]["message"].startswith("upstream sent an invalid stream event")
            mode["body"] = {"choices": [{"text": " fine", "finish_reason": "length"}],
                            "usage": {"prompt_tokens": 4, "completion_tokens": 2}}
            good = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert good.status_code == 200 and good.json()["choices"][0]["text"] == " fine"
            assert 'status="500"' not in c.get("/metrics").text
    finally:
        stop()
    for body in (b'{"choices": [{"text": null}]}', b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(EngineError, match="invalid answer"):
            parse_completion(body)


def test_item6_upstream_api_key_comes_from_the_named_environment_variable(full_run, fake_vllm, tmp_path):
    """--upstream-api-key-env: the key in that variable goes upstream as Bearer; unset -> exit 2;
    a key the upstream refuses -> exit 2 at once, naming --upstream."""
    bin_dir, log = fake_vllm
    up_port, key = _free_port(), "upstream-key-0123456789abcdef"
    upstream = subprocess.Popen([str(bin_dir / "vllm"), "serve", "m", "--host", "127.0.0.1", "--port", str(up_port),
                                 "--served-model-name", "fullgen"],
                                env={**os.environ, "VLLM_API_KEY": key, "FAKE_VLLM_LOG": str(log)})
    up_url = f"http://127.0.0.1:{up_port}"
    port = _free_port()
    try:
        wait_until(lambda: any(r.get("pid") for r in _rows(log)), 30, "the upstream")
        unset = runner.invoke(cli, ["serve", str(full_run), "--engine", "vllm", "--upstream", up_url,
                                    "--upstream-api-key-env", "TS_TEST_UPSTREAM_KEY"],
                              env={"TS_TEST_UPSTREAM_KEY": None})
        assert unset.exit_code == 2 and "TS_TEST_UPSTREAM_KEY is not set" in unset.output
        assert "--upstream-api-key-env" in _error_lines(unset.output)[0]
        wrong = runner.invoke(cli, ["serve", str(full_run), "--engine", "vllm", "--upstream", up_url,
                                    "--port", str(port),
                                    "--upstream-api-key-env", "TS_TEST_UPSTREAM_KEY"],
                              env={"TS_TEST_UPSTREAM_KEY": "not-the-key-0123456789"})
        assert wrong.exit_code == 2 and "401" in wrong.output and "--upstream" in _error_lines(wrong.output)[0]
        env = {**os.environ, "TS_TEST_UPSTREAM_KEY": key}
        env.pop("TUNESMITH_API_KEYS", None)
        proc = serve_process([str(full_run), "--engine", "vllm", "--upstream", up_url, "--port", str(port),
                               "--upstream-api-key-env", "TS_TEST_UPSTREAM_KEY"], env, tmp_path / "err.txt")
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: answers(url) or proc.poll() is not None, 180, "the sidecar")
            assert proc.poll() is None, (tmp_path / "err.txt").read_text()
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == " fake answer"
        finally:
            _terminate(proc)
        sent = {r["authorization"] for r in _rows(log) if r.get("path") == "/v1/completions"}
        assert sent == {f"Bearer {key}"}
        assert key not in (tmp_path / "err.txt").read_text()
    finally:
        upstream.terminate()
        upstream.wait(10)


# ---- item 8: keys, open servers, the Host header -----------------------------------------------

def test_item8_key_file_hash_starts_a_comment_only_at_line_start_and_short_keys_are_refused(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# operators\n  # indented comment\n{LONG_KEY}\n\n  second-key-0123456789  \n", encoding="utf-8")
    assert load_keys(keys, environ={}) == [LONG_KEY, "second-key-0123456789"]
    keys.write_text(f"{LONG_KEY}\n# fine\nshort#comment\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_keys(keys, environ={})
    assert err.value.where == f"{keys}:3" and "shorter than 16" in err.value.what
    assert "short#comment" not in err.value.line()  # the error never prints a key
    empty = tmp_path / "empty-keys.txt"
    empty.write_text("# only comments\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="holds no key"):  # a key file that opens the server is a mistake
        load_keys(empty, environ={})
    with pytest.raises(InputError) as err:
        load_keys(None, environ={"TUNESMITH_API_KEYS": f"{LONG_KEY}, tooshort"})
    assert err.value.where == "TUNESMITH_API_KEYS"
    # a key no client can send (headers are read as Latin-1 bytes) would lock everyone out: refused
    for key in ("ключ-ключ-ключ-ключ-1234", "key with spaces inside 1234", "tab\tinside-the-key-0123"):
        keys.write_text(f"{LONG_KEY}\n{key}\n", encoding="utf-8")
        with pytest.raises(InputError) as err:
            load_keys(keys, environ={})
        assert err.value.where == f"{keys}:2" and "not visible ASCII" in err.value.what and key not in err.value.line()
    keys.write_text(f"# fine\n{LONG_KEY}\nshort#comment\n", encoding="utf-8")

    for args, env, where in (([f"--api-keys-file={keys}"], {"TUNESMITH_API_KEYS": None}, f"{keys}:3"),
                             ([], {"TUNESMITH_API_KEYS": "abc"}, "TUNESMITH_API_KEYS"),
                             ([f"--api-keys-file={tmp_path / 'missing.txt'}"], {}, "--api-keys-file")):
        result = runner.invoke(cli, ["serve", str(tmp_path), *args], env=env)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert len(_error_lines(result.output)) == 1 and where in _error_lines(result.output)[0]


def test_item8_no_keys_on_a_non_loopback_host_refuses_to_start(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "tunesmith.json").write_text("{}")  # enough to reach the variant lookup
    port = str(_free_port())
    refused = runner.invoke(cli, ["serve", str(run), "--host", "0.0.0.0", "--port", port],
                            env={"TUNESMITH_API_KEYS": None})
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    (line,) = _error_lines(refused.output)
    assert "--host" in line and "--insecure-no-auth" in line and "--api-keys-file" in line
    # past the check (the next step fails on the variant): with --insecure-no-auth, or with keys
    for extra, env in ((["--insecure-no-auth"], {"TUNESMITH_API_KEYS": None}),
                       ([], {"TUNESMITH_API_KEYS": LONG_KEY})):
        passed = runner.invoke(cli, ["serve", str(run), "--host", "0.0.0.0", "--port", port, "--variant", "nope",
                                     *extra], env=env)
        assert passed.exit_code == 2 and "no variant 'nope'" in passed.output, passed.output
    loopback = runner.invoke(cli, ["serve", str(run), "--port", port, "--variant", "nope"],
                             env={"TUNESMITH_API_KEYS": None})
    assert loopback.exit_code == 2 and "no variant 'nope'" in loopback.output


def test_item8_loopback_servers_answer_only_to_loopback_host_names():
    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

    guarded = loopback_guard(app, "127.0.0.1")
    assert isinstance(guarded, HostCheck) and loopback_guard(app, "0.0.0.0") is app

    async def statuses(hosts: list[str]) -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://x") as c:
            return [(await c.get("/v1/models", headers={"Host": h})).status_code for h in hosts]
    ok = ["localhost", "localhost:8000", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:8000", "[::1]", "[::1]:8000"]
    assert asyncio.run(statuses(ok)) == [200] * len(ok)
    rebinding = ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io:8000", "10.0.0.5"]
    assert asyncio.run(statuses(rebinding)) == [421] * len(rebinding)
    assert asyncio.run(statuses(["localhost:http", "[::1", "[::1]x", ""])) == [400] * 4

    async def from_pages(origins: list[str]) -> list[int]:  # a browser names the page's site in Origin
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://x") as c:
            return [(await c.post("/v1/feedback", content=b"{}", headers={"Host": "localhost:8000", "Origin": o})
                     ).status_code for o in origins]
    assert asyncio.run(from_pages(["http://localhost:3000", "http://127.0.0.1:8000", "http://[::1]:9"])) == [200] * 3
    assert asyncio.run(from_pages(["https://evil.example", "http://localhost.evil.example", "null"])) == [403] * 3

    sent: list[dict] = []

    async def send(message):
        sent.append(message)
    asyncio.run(guarded({"type": "http", "headers": []}, None, send))  # HTTP/1.0 without a Host header
    assert sent[0]["status"] == 400 and json.loads(sent[1]["body"])["error"]["code"] == 400
    assert is_loopback("127.0.0.2") and is_loopback("::1") and not is_loopback("0.0.0.0")
    assert host_name("[::1]:80") == "::1" and host_name("a:b:c") is None
    assert asyncio.run(_status(loopback_guard(app, "127.0.0.2"), "127.0.0.2:9")) == 200  # the bound name itself


async def _status(app, host: str) -> int:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as c:
        return (await c.get("/", headers={"Host": host})).status_code


# ---- item 13: the port ----------------------------------------------------------------------------

def test_item13_port_out_of_range_or_in_use_is_exit_2_naming_port(tmp_path):
    for port in ("80000", "0", "-1"):
        result = runner.invoke(cli, ["serve", str(tmp_path), "--port", port], env={"TUNESMITH_API_KEYS": None})
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        (line,) = _error_lines(result.output)
        assert "--port" in line and "out of range" in line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(cli, ["serve", str(tmp_path), "--port", str(port)], env={"TUNESMITH_API_KEYS": None})
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    (line,) = _error_lines(result.output)
    assert "--port" in line and "already in use" in line and str(port) in line
    # a second tunesmith while the first still loads its model: the first holds the port already
    first = bind_listener("127.0.0.1", _free_port())
    try:
        result = runner.invoke(cli, ["serve", str(tmp_path), "--port", str(first.port)],
                               env={"TUNESMITH_API_KEYS": None})
    finally:
        first.sock.close()
    assert result.exit_code == 2 and "already in use" in _error_lines(result.output)[0]
