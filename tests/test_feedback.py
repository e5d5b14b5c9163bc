"""Feedback on served answers (issue 20, item 1): a request_id on every answer (body, header, log row),
POST /v1/feedback (verdicts, 400/404/409/401/429/503, bounded writes, redaction) and
`tunesmith feedback import` (all rows or none, file:line errors), on a tiny trained run."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conftest import GEN_PROJECT, make_texts, train_tiny_run, write_jsonl
from tunesmith.cli import app as cli
from tunesmith.config import RequestLogSettings, ServeConfig
from tunesmith.serve import app as app_module
from tunesmith.serve.app import create_app
from tunesmith.serve.server import serve_settings
from tunesmith.serve.service import load_service
from tunesmith.serve.store import STORED_CHARS, RequestLog, labelled, recent

runner = CliRunner()
HEADER = "X-Tunesmith-Request-ID"
HEX32 = re.compile(r"[0-9a-f]{32}")
LABELS = {"alpha", "beta", "gamma"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("feedback"), tiny_model)


@pytest.fixture(scope="module")
def service(run):
    return load_service(run)


def _app(service, db: Path | None, keys=None, **cfg):
    return create_app(service, ServeConfig(**cfg), keys, db)


def _ids(answer) -> list[str]:
    return [r["request_id"] for r in answer.json()["results"]]


def _stream_ids(c, path: str, body: dict) -> tuple[str, list[str]]:
    with c.stream("POST", path, json={**body, "stream": True}) as s:
        header = s.headers[HEADER]
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return header, [json.loads(line[6:])["request_id"] for line in lines[:-1]]


def test_every_answer_carries_a_fresh_request_id_logged_with_its_run(service, run, tmp_path):
    db = tmp_path / "log.db"
    with TestClient(_app(service, db)) as c:
        one = c.post("/v1/classify", json={"text": "red card"})
        many = c.post("/v1/classify", json={"texts": ["red", "blue", "green"]})
        text = c.post("/v1/completions", json={"prompt": "green"})
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "blue"}]})
        header, chunk_ids = _stream_ids(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "red"}]})
    assert one.headers[HEADER] == one.json()["request_id"] == one.json()["results"][0]["request_id"]
    assert HEADER not in many.headers  # a batch has one id per result, in the body
    batch = [r["request_id"] for r in many.json()["results"]]
    assert text.headers[HEADER] == text.json()["request_id"] and chat.headers[HEADER] == chat.json()["request_id"]
    assert chunk_ids and set(chunk_ids) == {header}
    given = [one.json()["request_id"], *batch, text.json()["request_id"], chat.json()["request_id"], header]
    assert len(set(given)) == 7 and all(HEX32.fullmatch(i) for i in given)
    assert one.headers["X-Request-ID"] != one.headers[HEADER]  # the trace id stays its own
    rows = sqlite3.connect(db).execute("SELECT request_id, run_dir, route, input FROM requests ORDER BY id").fetchall()
    assert [r[0] for r in rows] == given and {r[1] for r in rows} == {str(run)}
    assert rows[-1][2] == "/v1/chat/completions" and rows[1][3] == "red"  # the stream's row, logged when it ended


def test_without_a_request_log_answers_carry_ids_and_feedback_is_503(service):
    with TestClient(_app(service, None)) as c:
        answer = c.post("/v1/classify", json={"text": "red"})
        assert HEX32.fullmatch(answer.json()["request_id"]) and answer.headers[HEADER] == answer.json()["request_id"]
        refused = c.post("/v1/feedback", json={"request_id": answer.json()["request_id"], "label": "beta"})
    assert refused.status_code == 503 and "request log" in refused.json()["error"]["message"]
    off = _app(service, Path("/nonexistent/never.db"), request_log=RequestLogSettings(enabled=False))
    with TestClient(off) as c:
        assert c.post("/v1/feedback", json={"request_id": "0" * 32, "rating": 1}).status_code == 503


class Seen:
    def __init__(self):
        self.count = 0

    def seen(self, n: int) -> None:
        self.count += n

    def close(self) -> None:
        pass


def test_feedback_is_stored_once_replaced_on_request_and_checked(service, tmp_path, monkeypatch):
    quality, real = Seen(), app_module.build_state

    def with_quality(*a, **k):  # helper B's live-quality counter, as the server will hold it
        state = real(*a, **k)
        if state.quality is not None:
            state.quality.close()
        state.quality = quality
        return state
    monkeypatch.setattr(app_module, "build_state", with_quality)
    db = tmp_path / "log.db"
    with TestClient(_app(service, db)) as c:
        ids = _ids(c.post("/v1/classify", json={"texts": ["red", "blue", "green"]}))
        first = c.post("/v1/feedback", json={"request_id": ids[0], "label": "gamma"})
        assert first.status_code == 200 and first.json() == {"request_id": ids[0], "stored": "new"}
        again = c.post("/v1/feedback", json={"request_id": ids[0], "rating": 1})
        assert again.status_code == 409 and '"replace": true' in again.json()["error"]["message"]
        replaced = c.post("/v1/feedback", json={"request_id": ids[0], "label": "beta", "replace": True})
        assert replaced.json() == {"request_id": ids[0], "stored": "replaced"}
        assert c.post("/v1/feedback", json={"request_id": ids[1].upper(), "rating": 0}).json()["stored"] == "new"
        mail = c.post("/v1/feedback", json={"request_id": ids[2], "correction": "write to ann.lee@example.com"})
        assert mail.status_code == 200
        unknown = c.post("/v1/feedback", json={"request_id": "f" * 32, "label": "alpha"})
        assert unknown.status_code == 404 and "f" * 32 in unknown.json()["error"]["message"]
        bad = [{"request_id": ids[1], "label": "a", "rating": 1}, {"request_id": ids[1]},
               {"request_id": ids[1], "label": " "}, {"request_id": ids[1], "rating": 2},
               {"request_id": ids[1], "rating": True}, {"request_id": ids[1], "rating": 1.0},
               {"request_id": ids[1], "correction": "x" * (STORED_CHARS + 1)},
               {"request_id": ids[1], "label": "x" * 201}, {"request_id": ids[1], "correction": "bad \ud800 text"},
               {"request_id": ids[1], "label": "two\nlines"}, {"request_id": ids[1], "correction": "bell \x07"},
               {"request_id": ids[1], "label": "a\u2028b"}, {"request_id": ids[1], "label": "\u202elabel"},
               {"request_id": ids[1], "label": "a\u200fb"}, {"request_id": ids[1], "label": "\u200b"},
               {"request_id": ids[1], "label": "a\ufeffb"},
               {"request_id": "not-an-id", "label": "alpha"}, {"label": "alpha"},
               {"request_id": ids[1], "rating": 1, "replace": "yes"}, {"request_id": ids[1], "rating": 1, "x": 1}]
        for body in bad:
            answer = c.post("/v1/feedback", content=json.dumps(body),  # ASCII JSON: "\ud800" as sent on the wire
                            headers={"content-type": "application/json"})
            assert answer.status_code == 400 and answer.json()["error"]["message"], body
        metrics = c.get("/metrics").text
    assert 'tunesmith_requests_total{route="/v1/feedback",status="200"} 4.0' in metrics
    assert quality.count == 4  # every stored verdict, none of the refused
    verdicts = {r.request_id: r for r in labelled(db)}
    assert verdicts[ids[0]].label == "beta" and verdicts[ids[1]].rating == 0 and verdicts[ids[1]].truth is None
    assert verdicts[ids[2]].correction == "write to [EMAIL]"  # redacted like an input
    assert sqlite3.connect(db).execute("SELECT source FROM feedback").fetchall() == [("api",)] * 3


def test_feedback_needs_a_key_and_counts_against_its_rate_limit(service, tmp_path):
    key = {"Authorization": "Bearer feedback-key-0123456789"}
    app = _app(service, tmp_path / "log.db", keys=["feedback-key-0123456789"], rate_limit_per_minute=3)
    with TestClient(app) as c:
        rid = c.post("/v1/classify", json={"text": "red"}, headers=key).json()["request_id"]
        assert c.post("/v1/feedback", json={"request_id": rid, "rating": 1}).status_code == 401
        assert c.post("/v1/feedback", json={"request_id": rid, "rating": 1}, headers=key).status_code == 200
        assert c.post("/v1/feedback", json={"request_id": rid, "rating": 0}, headers=key).status_code == 409
        limited = c.post("/v1/feedback", json={"request_id": rid, "rating": 0, "replace": True}, headers=key)
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    key_id = sqlite3.connect(tmp_path / "log.db").execute("SELECT key_id FROM feedback").fetchone()[0]
    assert key_id and "feedback-key" not in key_id  # the key's id, never the key


def test_feedback_writes_are_bounded_and_off_the_event_loop(service, tmp_path):
    """With serve.max_queue 1 and the one write held in SQLite, a second verdict is a 503 with
    Retry-After at once, and /healthz answers meanwhile; released, the first is stored."""
    app = _app(service, tmp_path / "log.db", max_queue=1)
    held, entered = threading.Event(), threading.Event()

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            ids = _ids(await c.post("/v1/classify", json={"texts": ["red", "blue"]}))
            store, real = app.state.store, app.state.store.add_feedback

            def slow(*a, **k):
                entered.set()
                held.wait(30)
                return real(*a, **k)
            store.add_feedback = slow
            first = asyncio.create_task(c.post("/v1/feedback", json={"request_id": ids[0], "rating": 1}))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            second = await c.post("/v1/feedback", json={"request_id": ids[1], "rating": 1})
            waited, health = time.perf_counter() - started, (await c.get("/healthz")).status_code
            held.set()
            return (await first), second, waited, health
    with TestClient(app):  # runs the app's lifespan (the state is closed at the end)
        first, second, waited, health = asyncio.run(scenario())
    assert second.status_code == 503 and second.headers["Retry-After"] == "1" and waited < 5
    assert health == 200 and first.status_code == 200 and first.json()["stored"] == "new"


def test_purge_deletes_a_verdict_with_its_request(tmp_path):
    log = RequestLog(tmp_path / "log.db", retention_days=1)
    log.write([{"route": "/v1/classify", "input": "old", "output": "alpha", "request_id": "a" * 32},
               {"route": "/v1/classify", "input": "new", "output": "beta", "request_id": "b" * 32}])
    assert log.add_feedback("a" * 32, label="beta") == "new" and log.add_feedback("b" * 32, rating=1) == "new"
    with sqlite3.connect(tmp_path / "log.db") as other:  # as if answered two days ago
        other.execute("UPDATE requests SET ts = ts - 2 * 86400 WHERE request_id = ?", ("a" * 32,))
    assert log.purge() == 1
    log.close()
    left = sqlite3.connect(tmp_path / "log.db").execute("SELECT request_id FROM feedback").fetchall()
    assert left == [("b" * 32,)]


def _log_with(db: Path, n: int) -> list[str]:
    ids = [f"{i:032x}" for i in range(1, n + 1)]
    log = RequestLog(db)
    log.write([{"route": "/v1/classify", "input": f"text {i}", "output": "alpha", "request_id": rid}
               for i, rid in enumerate(ids)])
    log.close()
    return ids


def _verdicts(db: Path) -> list[tuple]:
    return sqlite3.connect(db).execute("SELECT request_id, label, correction, rating, source FROM feedback "
                                       "ORDER BY request_id").fetchall()


def test_feedback_import_stores_all_rows_or_none(tmp_path, monkeypatch):
    db, ids = tmp_path / "log.db", _log_with(tmp_path / "log.db", 5)
    good = write_jsonl(tmp_path / "good.jsonl", [{"request_id": ids[0], "label": "beta", "text": "ignored"},
                                                 {"request_id": ids[1], "rating": 0},
                                                 {"request_id": ids[2], "correction": "mail x.y@example.com"}])
    result = runner.invoke(cli, ["feedback", "import", str(good), "--db", str(db)])
    assert result.exit_code == 0, result.output
    assert f"imported 3 verdicts (new 3, replaced 0) into {db}" in result.output
    assert _verdicts(db)[2] == (ids[2], None, "mail [EMAIL]", None, "import")
    csv = tmp_path / "more.csv"
    csv.write_text(f"request_id,label,rating\n{ids[0]},,1\n{ids[3]},gamma,\n", encoding="utf-8")
    result = runner.invoke(cli, ["feedback", "import", str(csv), "--db", str(db), "--replace"])
    assert result.exit_code == 0 and "imported 2 verdicts (new 1, replaced 1)" in result.output, result.output
    before = _verdicts(db)
    assert len(before) == 4 and before[0] == (ids[0], None, None, 1, "import") and before[3][1] == "gamma"
    bad_rows = {
        "unknown request_id": [{"request_id": ids[1], "rating": 1}, {"request_id": "e" * 32, "label": "a"}],
        "exactly one": [{"request_id": ids[0], "rating": 1}, {"request_id": ids[1], "label": "a", "rating": 1}],
        "request_id": [{"request_id": ids[0], "rating": 1}, {"label": "a"}],
        "already has a verdict": [{"request_id": ids[4], "rating": 1}, {"request_id": ids[2], "rating": 1}],
        "appears twice": [{"request_id": ids[0], "rating": 1}, {"request_id": ids[0].upper(), "rating": 0}],
        "valid integer": [{"request_id": ids[0], "rating": 1}, {"request_id": ids[1], "rating": True}],
        "0 (the answer was wrong)": [{"request_id": ids[0], "rating": 1}, {"request_id": ids[1], "rating": 2}],
    }
    for reason, rows in bad_rows.items():
        path = write_jsonl(tmp_path / "bad.jsonl", rows)
        replace = [] if reason == "already has a verdict" else ["--replace"]  # with it, line 1 alone would be stored
        result = runner.invoke(cli, ["feedback", "import", str(path), "--db", str(db), *replace])
        assert result.exit_code == 2 and "error: " in result.output, (reason, result.output)
        assert f"{path}:2, " in result.output and reason in result.output, (reason, result.output)  # a hint follows
        assert _verdicts(db) == before, reason  # nothing written
    broken = tmp_path / "broken.jsonl"
    broken.write_text(f'{{"request_id": "{ids[0]}", "rating": 1}}\n{{bad\n', encoding="utf-8")
    result = runner.invoke(cli, ["feedback", "import", str(broken), "--db", str(db), "--replace"])
    assert result.exit_code == 2 and "invalid JSON" in result.output and f"{broken}:2, fix" in result.output
    assert _verdicts(db) == before
    import pandas as pd

    frame = pd.DataFrame({"request_id": [ids[0], ids[1]], "label": ["beta", None], "rating": [None, 1]})
    assert frame["rating"].dtype == float  # pandas: a column with gaps is floats, NaN where none
    for path in (tmp_path / "pd.parquet", tmp_path / "pd.csv"):
        frame.to_parquet(path) if path.suffix == ".parquet" else frame.to_csv(path, index=False)
        result = runner.invoke(cli, ["feedback", "import", str(path), "--db", str(db), "--replace"])
        assert result.exit_code == 0 and "imported 2 verdicts (new 0, replaced 2)" in result.output, result.output
    assert _verdicts(db)[:2] == [(ids[0], "beta", None, None, "import"), (ids[1], None, None, 1, "import")]
    before = _verdicts(db)

    def refuse_writes(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")
    monkeypatch.setattr(RequestLog, "import_feedback", refuse_writes)  # a read-only log (root reads any file)
    result = runner.invoke(cli, ["feedback", "import", str(good), "--db", str(db), "--replace"])
    assert result.exit_code == 2 and "cannot open the request log for this user" in result.output, result.output
    monkeypatch.undo()
    csv.write_text(f"request_id,rating\n{ids[1]},yes\n", encoding="utf-8")
    result = runner.invoke(cli, ["feedback", "import", str(csv), "--db", str(db), "--replace"])
    assert result.exit_code == 2 and f"{csv}:2" in result.output and _verdicts(db) == before
    result = runner.invoke(cli, ["feedback", "import", str(good), "--db", str(tmp_path / "none.db")])
    assert result.exit_code == 2 and "no request log" in result.output and not (tmp_path / "none.db").exists()
    result = runner.invoke(cli, ["feedback", "import", str(good)])
    assert result.exit_code == 2 and "--run" in result.output
    result = runner.invoke(cli, ["feedback", "import", str(tmp_path), "--db", str(db)])  # a folder: not "not found"
    assert result.exit_code == 2 and f"verdict file is not a regular file: {tmp_path}" in result.output


def test_feedback_import_into_a_served_runs_log(service, run):
    """Answers served with the run's own log (serve.request_log defaults), then labels imported with --run."""
    _, db = serve_settings(run)
    unserved = write_jsonl(run.parent / "early.jsonl", [{"request_id": "a" * 32, "label": "gamma"}])
    result = runner.invoke(cli, ["feedback", "import", str(unserved), "--run", str(run)])  # not served yet
    assert result.exit_code == 2 and f"no request log at {db}, --run, serve the run first" in result.output
    assert not db.exists()
    with TestClient(_app(service, db)) as c:
        ids = _ids(c.post("/v1/classify", json={"texts": ["red", "blue"]}))
    rows = write_jsonl(run.parent / "labels.jsonl", [{"request_id": i, "label": "gamma"} for i in ids])
    result = runner.invoke(cli, ["feedback", "import", str(rows), "--run", str(run)])
    assert result.exit_code == 0 and f"(new 2, replaced 0) into {db}" in result.output, result.output
    found = labelled(db, run_dir=str(run))
    assert [r.request_id for r in found] == ids and all(r.truth == "gamma" for r in found)
    assert {r.output for r in found} <= LABELS


def test_a_log_in_a_folder_named_with_uri_characters_is_read(tmp_path):
    """`?`, `#` and `%` in a path are part of it, never URI syntax (query, fragment, escape)."""
    db = tmp_path / "a?b#c%" / "log.db"
    db.parent.mkdir()
    ids = _log_with(db, 3)
    rows = write_jsonl(tmp_path / "labels.jsonl", [{"request_id": i, "label": "beta"} for i in ids[:2]])
    result = runner.invoke(cli, ["feedback", "import", str(rows), "--db", str(db)])
    assert result.exit_code == 0 and "imported 2 verdicts" in result.output, result.output
    assert [r.request_id for r in labelled(db)] == ids[:2]
    assert [r["request_id"] for r in recent(db, 10)] == ids


def test_a_file_that_is_not_a_request_log_is_an_input_error(run, tmp_path):
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all " * 200)
    rows = write_jsonl(tmp_path / "labels.jsonl", [{"request_id": "a" * 32, "label": "beta"}])
    for args in (["feedback", "import", str(rows), "--db", str(garbage)], ["monitor", str(run), "--db", str(garbage)]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2 and "not a request log" in result.output, (args, result.output)
        assert str(garbage) in result.output and "Traceback" not in result.output
    assert garbage.read_bytes() == b"not sqlite at all " * 200


def test_another_apps_database_with_a_requests_table_is_refused_unchanged(run, tmp_path):
    """A `requests` table alone does not make a request log: opening it as one would add our columns,
    tables and indexes (and WAL mode) to someone else's database before finding it is not one."""
    other = tmp_path / "app.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE requests (x INTEGER)")
        c.execute("CREATE TABLE mydata (a TEXT)")
    before = other.read_bytes()
    rows = write_jsonl(tmp_path / "labels.jsonl", [{"request_id": "a" * 32, "label": "beta"}])
    for args in (["feedback", "import", str(rows), "--db", str(other)], ["monitor", str(run), "--db", str(other)]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert "not a request log (its requests table lacks the column(s) confidence, id, " in result.output
    assert other.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["app.db", "labels.jsonl"]
    # serve's own log (serve.request_log.path) pointed at it: refused at start, the file untouched
    from tunesmith.errors import InputError
    from tunesmith.serve.store import RequestLog

    with pytest.raises(InputError, match="not a request log"):
        RequestLog(other)
    (tmp_path / "empty.db").write_bytes(b"")
    RequestLog(tmp_path / "empty.db").close()  # an empty file becomes a new log
    assert other.read_bytes() == before and "requests" in sqlite3.connect(tmp_path / "empty.db").execute(
        "SELECT group_concat(name) FROM sqlite_master WHERE type='table'").fetchone()[0]


@pytest.fixture(scope="module")
def gen_service(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("feedback-gen")
    rows = [{"prompt": r["text"], "completion": r["label"]} for r in make_texts(12, 3)]
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:3])
    project = GEN_PROJECT.format(name="tinygen", model=tiny_model, method="lora", steps=1, new_tokens=2)
    (folder / "project.yaml").write_text(project, encoding="utf-8")
    result = runner.invoke(cli, ["run", str(folder / "project.yaml"), "--out", str(folder / "run"), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    return load_service(folder / "run")


def test_the_log_tells_a_token_prompt_from_a_text_prompt(gen_service, tmp_path):
    """A token prompt is logged with its ids decoded (the prompt format inside): marked "tokens", so
    retrain never takes it for a text prompt and wraps it in the format again."""
    db = tmp_path / "log.db"
    ids = gen_service.predictor.tokenizer("red card", add_special_tokens=False)["input_ids"]
    with TestClient(_app(gen_service, db, max_tokens=4)) as c:
        given = [c.post("/v1/completions", json={"prompt": p, "max_tokens": 2}).json()["request_id"]
                 for p in (ids, "red card")]
        given.append(_stream_ids(c, "/v1/completions", {"prompt": ids, "max_tokens": 2})[0])
        given.append(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 2}).json()["request_id"])
    kinds = dict(sqlite3.connect(db).execute("SELECT request_id, prompt_kind FROM requests").fetchall())
    assert [kinds[i] for i in given] == ["tokens", "text", "tokens", "text"]


class _FailingCommit:
    """A connection whose COMMIT fails (disk full at the commit), everything else passed through."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def test_a_failed_commit_rolls_back_and_the_log_goes_on(tmp_path):
    """Without the rollback the connection would stay inside the failed transaction: every later write
    would fail ("cannot start a transaction within a transaction") and the open one would hold the lock."""
    ids = _log_with(tmp_path / "log.db", 2)
    log = RequestLog(tmp_path / "log.db")
    real = log._db
    log._db = _FailingCommit(real)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        log.add_feedback(ids[0], label="beta")
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        log.purge()
    assert not real.in_transaction
    log._db = real
    assert log.add_feedback(ids[0], label="beta") == "new" and log.purge() == 0
    log.close()
    assert _verdicts(tmp_path / "log.db") == [(ids[0], "beta", None, None, "api")]
