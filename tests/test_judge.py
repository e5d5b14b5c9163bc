"""LLM judge against a fake OpenAI-compatible endpoint on loopback: parsing, scoring, and the
position swap that cancels a judge's bias for the first answer."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tunesmith.config import JudgeConfig
from tunesmith.evaluate.judge import judge_answers, make_asker, parse_score, parse_verdict


def _serve(decide, raw=None):
    """A chat-completions server whose reply is decide(prompt) (or the body `raw` as it is); returns
    (base URL, requests seen, server)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][0]["content"]
            seen.append({"prompt": prompt, "auth": self.headers.get("Authorization"), "model": body["model"]})
            reply = {"choices": [{"message": {"role": "assistant", "content": decide(prompt)}}]}
            data = raw if raw is not None else json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/v1", seen, server


def _fair(prompt: str) -> str:
    """Prefers the answer equal to the reference; grades 9 for a right answer, 2 otherwise."""
    ref = prompt.split("Reference answer:\n")[1].split("\n")[0]
    if "Answer A:" in prompt:
        a = prompt.split("Answer A:\n")[1].split("\n")[0]
        b = prompt.split("Answer B:\n")[1].split("\n")[0]
        return "Verdict: A" if a == ref and b != ref else "Verdict: B" if b == ref and a != ref else "Verdict: tie"
    answer = prompt.split("Answer to grade:\n")[1].split("\n")[0]
    return "Score: 9" if answer == ref else "Score: 2"


QUESTIONS = [f"q{i}" for i in range(6)]
REFS = [f"r{i}" for i in range(6)]
BASE = ["r0", "x", "x", "x", "r4", "x"]
TUNED = ["r0", "r1", "r2", "x", "r4", "r5"]


def test_endpoint_judge_scores_and_pairs(monkeypatch):
    url, seen, server = _serve(_fair)
    monkeypatch.setenv("JUDGE_KEY", "sekret")
    try:
        cfg = JudgeConfig(enabled=True, endpoint=url, model="grader", api_key_env="JUDGE_KEY",
                          allowed_env=["JUDGE_KEY"])
        result = judge_answers(make_asker(cfg), cfg.rubric, QUESTIONS, REFS, BASE, TUNED)
    finally:
        server.shutdown()
    assert result.single["baseline"]["mean_score"] == pytest.approx((9 * 2 + 2 * 4) / 6, abs=1e-4)
    assert result.single["finetuned"]["mean_score"] == pytest.approx((9 * 5 + 2) / 6, abs=1e-4)
    assert result.pairwise == {"pairs": 6, "win": 0.5, "tie": 0.5, "loss": 0.0, "position_consistency": 1.0}
    assert seen[0]["auth"] == "Bearer sekret" and seen[0]["model"] == "grader"
    assert len(seen) == 6 * 2 + 6 * 2  # single grades for both models, each pair asked in both orders


def test_position_swap_cancels_a_judge_that_always_says_a():
    url, _, server = _serve(lambda prompt: "Verdict: A" if "Answer A:" in prompt else "Score: 5")
    try:
        cfg = JudgeConfig(enabled=True, endpoint=url, mode="pairwise")
        result = judge_answers(make_asker(cfg), cfg.rubric, QUESTIONS, REFS, BASE, TUNED, mode="pairwise")
    finally:
        server.shutdown()
    assert result.pairwise["win"] == 0.0 and result.pairwise["loss"] == 0.0 and result.pairwise["tie"] == 1.0
    assert result.pairwise["position_consistency"] == 0.0
    assert result.single == {}


def test_reply_parsing():
    assert parse_score("Score: 7") == 7
    assert parse_score("score = 11") == 10 and parse_score("no number") is None
    assert parse_verdict("Verdict: b") == "B" and parse_verdict("verdict: TIE") == "tie"
    assert parse_verdict("A, clearly") == "A" and parse_verdict("hmm") is None


def test_judge_needs_an_endpoint_or_model():
    with pytest.raises(ValueError, match="eval.judge.endpoint"):
        JudgeConfig(enabled=True)


@pytest.mark.parametrize("raw", [b'{"x": 1}', b"not json", b'{"choices": []}', b'{"choices": [{"message": 5}]}',
                                 b"x" * 1_200_000])
def test_a_malformed_or_endless_judge_reply_is_one_error_naming_the_endpoint(raw):
    """The endpoint's answer is untrusted: a KeyError was an internal error, and the body had no bound."""
    from tunesmith.errors import InputError

    url, _, server = _serve(lambda prompt: "Score: 5", raw=raw)
    try:
        with pytest.raises(InputError) as refused:
            make_asker(JudgeConfig(enabled=True, endpoint=url))("grade this")
    finally:
        server.shutdown()
    assert refused.value.where == "eval.judge.endpoint"
    assert "not an OpenAI chat completion" in refused.value.what or "more than 1,000,000 bytes" in refused.value.what
