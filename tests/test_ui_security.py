"""`tunesmith ui`'s security layer: no path outside --root readable (.., encoded .., absolute paths,
NUL, symlinks), CSRF tokens and Origin on state-changing routes, API keys (Bearer or the key form's
cookie, compared in constant time), the security headers, and the same host rule as `tunesmith serve`."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import typer
from fastapi import Depends, HTTPException
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tunesmith.cli.ui import register
from tunesmith.cli.ui import security as sec
from tunesmith.cli.ui.app import UiSettings, asgi_app, create_app, serve_ui
from tunesmith.errors import InputError

KEY = "k" * 20 + "-right-key"
OTHER = "o" * 24


def fake_run(folder):
    """A folder shaped as a run directory (model/tunesmith.json) with one file to read."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "tunesmith.json").write_text("{}")
    (folder / "summary.json").write_text(json.dumps({"secret": "outside"}))
    return folder


@pytest.fixture()
def tree(tmp_path):
    """root/run (a run inside the root) and outside/run (a run beside it, never readable)."""
    root = tmp_path / "root"
    fake_run(root / "run")
    fake_run(tmp_path / "outside" / "run")
    return root


def client(root, keys=None) -> TestClient:
    return TestClient(create_app(UiSettings(root=root, api_keys=keys)))


@pytest.mark.parametrize("rel", ["..", "../outside/run/summary.json", "run/../../outside/run/summary.json",
                                 "/etc/passwd", "\\etc\\passwd", "C:/Windows", "run/\x00summary.json",
                                 "x" * 2000])
def test_inside_root_refuses_paths_that_leave_the_root(tree, rel):
    with pytest.raises(HTTPException) as e:
        sec.inside_root(tree, rel)
    assert e.value.status_code == 404


def test_inside_root_keeps_paths_inside(tree):
    assert sec.inside_root(tree, "run/summary.json") == (tree / "run" / "summary.json").resolve()
    assert sec.inside_root(tree, "") == tree.resolve()
    assert sec.inside_root(tree, "not/yet/written.jsonl").parent == (tree / "not" / "yet").resolve()


def test_a_symlink_leaving_the_root_is_refused_one_inside_is_fine(tree):
    os.symlink(tree.parent / "outside" / "run" / "summary.json", tree / "run" / "leak.json")
    os.symlink(tree.parent / "outside", tree / "run" / "outdir")
    os.symlink(tree / "run" / "summary.json", tree / "run" / "alias.json")
    for rel in ("run/leak.json", "run/outdir/run/summary.json"):
        with pytest.raises(HTTPException):
            sec.inside_root(tree, rel)
    assert sec.inside_root(tree, "run/alias.json") == (tree / "run" / "summary.json").resolve()
    c = client(tree)
    assert c.get("/files/run/leak.json").status_code == 404
    assert c.get("/files/run/outdir/run/summary.json").status_code == 404
    assert c.get("/files/run/alias.json").json() == {"secret": "outside"}


@pytest.mark.parametrize("url", ["/files/%2e%2e/outside/run/summary.json",
                                 "/files/run/%2e%2e/%2e%2e/outside/run/summary.json",
                                 "/files/run/..%2f..%2foutside/run/summary.json",
                                 "/files/%2Fetc%2Fpasswd", "/files/run/summary.json%00",
                                 "/runs/%2e%2e/outside/run", "/compare/page?a=run&b=../outside/run"])
def test_http_routes_refuse_traversal(tree, url):
    c = client(tree)
    assert c.get("/files/run/summary.json").status_code == 200  # the same file inside is served
    r = c.get(url)
    assert r.status_code == 404 and "outside" not in r.text


def test_files_outside_run_directories_are_not_served(tree):
    (tree / "notes.txt").write_text("not a run's file")
    c = client(tree)
    assert c.get("/files/notes.txt").status_code == 404
    assert c.get("/files/run").status_code == 404  # a folder is not a file


def csrf_client(root) -> tuple[TestClient, str]:
    app = create_app(UiSettings(root=root))
    app.add_api_route("/api/test-change", lambda: {"changed": True}, methods=["POST"],
                      dependencies=[Depends(sec.csrf)])
    return TestClient(app), app.state.ui.csrf_token


def test_csrf_token_and_origin(tree):
    c, token = csrf_client(tree)
    assert c.post("/api/test-change").status_code == 403
    assert c.post("/api/test-change", headers={sec.CSRF_HEADER: token[:-1] + "x"}).status_code == 403
    assert c.post("/api/test-change", headers={sec.CSRF_HEADER: token,
                                               "Origin": "http://evil.example"}).status_code == 403
    assert c.post("/api/test-change", headers={sec.CSRF_HEADER: token, "Origin": "null"}).status_code == 403
    ok = c.post("/api/test-change", headers={sec.CSRF_HEADER: token, "Origin": "http://testserver"})
    assert ok.status_code == 200 and ok.json() == {"changed": True}
    assert c.post("/api/test-change", headers={sec.CSRF_HEADER: token}).status_code == 200
    assert f"<meta name='csrf-token' content='{token}'>" in c.get("/").text


def test_without_a_key_pages_and_api_answer_401(tree):
    c = client(tree, [KEY, OTHER])
    page = c.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 401 and "name='key'" in page.text and "run" not in page.text.split("<form")[0]
    for url in ("/api/runs", "/files/run/summary.json", "/runs/run"):
        r = c.get(url)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert c.get("/api/runs", headers={"Authorization": "Bearer " + KEY[:-1]}).status_code == 401
    assert c.get("/api/runs", headers={"Authorization": "Basic " + KEY}).status_code == 401
    assert c.get("/static/ui.css").status_code == 200  # the key form needs its stylesheet


def test_bearer_key_opens_everything(tree):
    c = client(tree, [KEY, OTHER])
    for key in (KEY, OTHER):
        r = c.get("/files/run/summary.json", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json() == {"secret": "outside"}


def test_key_form_sets_a_strict_httponly_cookie(tree):
    c = client(tree, [KEY])
    wrong = c.post("/login", data={"key": OTHER, "next": "/runs/run"}, follow_redirects=False)
    assert wrong.status_code == 401 and "wrong API key" in wrong.text and "set-cookie" not in wrong.headers
    r = c.post("/login", data={"key": KEY, "next": "/runs/run"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/runs/run"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and KEY not in r.headers["set-cookie"]
    assert c.get("/api/runs").status_code == 200  # the cookie now opens the app
    c.cookies.clear()
    assert c.get("/api/runs").status_code == 401
    c.cookies.set(sec.COOKIE, "forged")
    assert c.get("/api/runs").status_code == 401
    away = c.post("/login", data={"key": KEY, "next": "//evil.example/x"}, follow_redirects=False)
    assert away.headers["location"] == "/"
    cross = c.post("/login", data={"key": KEY}, headers={"Origin": "http://evil.example"})
    assert cross.status_code == 403


def test_an_oversized_body_is_refused_before_it_is_read_whole():
    # A body with no declared length is read chunk by chunk and refused once past the limit; a
    # declared length past it is refused before any chunk is read.
    from starlette.requests import Request

    received = []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": len(received) < 1000}

    def read(headers, limit):
        return asyncio.run(sec.read_capped(Request({"type": "http", "method": "POST", "headers": headers}, receive),
                                           limit))

    with pytest.raises(HTTPException) as e:
        read([], 5000)
    assert e.value.status_code == 413 and len(received) == 6
    received.clear()
    with pytest.raises(HTTPException) as e:
        read([(b"content-length", b"1000000")], 5000)
    assert e.value.status_code == 413 and received == []
    assert read([], 1_000_000) == b"x" * 1_000_000


def test_every_route_that_reads_a_body_caps_it(tree):
    keyed = client(tree, [KEY])
    login = keyed.post("/login", content=b"key=" + b"k" * sec.MAX_LOGIN_BODY,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert login.status_code == 413 and "set-cookie" not in login.headers
    c = TestClient(create_app(UiSettings(root=tree)))
    token = c.app.state.ui.csrf_token
    # (the label-review import, capped at 20 MiB, is checked in test_ui_review.py)
    for route in ("/api/validate", "/api/estimate", "/api/jobs", "/api/play/classify", "/api/rate/rating",
                  "/api/review/decision"):
        huge = c.post(route, content=b'{"values": "' + b"x" * (2 << 20) + b'"}',
                      headers={"Content-Type": "application/json", sec.CSRF_HEADER: token})
        assert huge.status_code == 413, route


def test_every_route_that_reads_a_body_refuses_one_nested_past_the_stack(tree):
    """~60 KB of `[[[...]]]`, under every cap: json.loads raises RecursionError, which is a 400 too."""
    c = TestClient(create_app(UiSettings(root=tree)), raise_server_exceptions=False)
    token = c.app.state.ui.csrf_token
    deep = b'{"values": {}, "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    for route in ("/api/validate", "/api/estimate", "/api/jobs", "/api/play/classify", "/api/rate/rating",
                  "/api/review/decision"):
        reply = c.post(route, content=deep, headers={"Content-Type": "application/json", sec.CSRF_HEADER: token})
        assert reply.status_code == 400, (route, reply.status_code)


def test_a_body_trickled_past_the_time_limit_is_cut_off(tree, monkeypatch):
    # /login reads its body before any key is checked: a client sending it byte by byte gets a 408.
    monkeypatch.setattr(sec, "BODY_SECONDS", 0.2)
    app, sent = asgi_app(UiSettings(root=tree, api_keys=[KEY])), []

    async def trickle():
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b"k", "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/login", "raw_path": b"/login", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:7860"), (b"transfer-encoding", b"chunked")], "scheme": "http",
             "server": ("127.0.0.1", 7860), "client": ("127.0.0.1", 5000), "root_path": "", "http_version": "1.1"}
    asyncio.run(asyncio.wait_for(app(scope, trickle, send), 10))
    assert sent[0]["status"] == 408 and b"not received within 0.2 s" in sent[1]["body"]


def test_a_request_without_a_body_is_never_cut_off():
    # No Content-Length and no Transfer-Encoding: no body to time. A streaming page's first receive()
    # (its disconnect watch) may come after the limit, as from a busy thread pool.
    from tunesmith.serve.limits import BodyLimit

    sent = []

    async def late_reader(scope, receive, send):
        await asyncio.sleep(0.3)
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message["type"].encode()})

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/events", "headers": [(b"host", b"localhost")]}
    asyncio.run(BodyLimit(late_reader, 1000, 0.1)(scope, receive, send))
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"http.request"


def test_keys_are_compared_in_constant_time(tree, monkeypatch):
    calls = []
    real = sec.hmac.compare_digest
    monkeypatch.setattr(sec.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    c = client(tree, [KEY, OTHER, "z" * 30])
    c.post("/login", data={"key": KEY}, follow_redirects=False)
    assert len(calls) == 3  # every key compared, even though the first one matched
    calls.clear()
    assert c.get("/api/runs").status_code == 200
    assert len(calls) == 6  # the (missing) Bearer key against all 3, then the cookie against all 3


def test_security_headers(tree):
    c = client(tree)
    page = c.get("/")
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-frame-options"] == "SAMEORIGIN"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    served = c.get("/files/run/summary.json")
    assert "sandbox" in served.headers["content-security-policy"]  # a run's files never run in the app's origin
    assert "<script" not in page.text.split("</head>")[1]  # no inline script anywhere in the body


def test_loopback_host_header_check(tree):
    c = TestClient(asgi_app(UiSettings(root=tree)), base_url="http://evil.example")
    assert c.get("/").status_code == 421
    assert TestClient(asgi_app(UiSettings(root=tree)), base_url="http://localhost:7860").get("/").status_code == 200


def test_an_open_host_needs_keys(tree):
    with pytest.raises(InputError, match="no API keys are set and --host 0.0.0.0"):
        serve_ui(UiSettings(root=tree, host="0.0.0.0", port=1))
    cli = typer.Typer()
    register(cli)
    cli.command("other")(lambda: None)
    result = CliRunner().invoke(cli, ["ui", "--host", "0.0.0.0", "--root", str(tree)],
                                env={"TUNESMITH_API_KEYS": ""})
    assert result.exit_code == 2
    assert result.output.startswith("error: no API keys are set and --host 0.0.0.0 is reachable from other machines")
    bad_root = CliRunner().invoke(cli, ["ui", "--root", str(tree / "missing")])
    assert bad_root.exit_code == 2 and "--root" in bad_root.output
