"""`tunesmith ui` Rate: blinded pairs created as `tunesmith human export` makes them, each rating saved
into the run's human/ratings-NAME.csv in the stand-alone form's format, and results.json updated as
`tunesmith human import` computes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conftest import train_tiny_run
from tunesmith.cli import app as cli_app
from tunesmith.cli.ui.app import UiSettings, create_app
from tunesmith.evaluate.human import read_ratings

REL = "runs/cls/run"


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("ui-rate")
    (root / "runs" / "cls").mkdir(parents=True)
    train_tiny_run(root / "runs" / "cls", tiny_model)
    return root


@pytest.fixture(scope="module")
def client(root):
    application = create_app(UiSettings(root=root))
    c = TestClient(application)
    c.headers["X-Tunesmith-CSRF"] = application.state.ui.csrf_token
    return c


def test_create_pairs_rate_and_import_as_the_cli_does(root, client):
    human = root / REL / "human"
    first = client.get("/rate", params={"run": REL})
    assert first.status_code == 200 and "rate-create" in first.text and "rate.js" in first.text
    assert TestClient(client.app).post("/api/rate/export", json={"run": REL}).status_code == 403  # no CSRF token
    made = client.post("/api/rate/export", json={"run": REL})
    assert made.status_code == 200, made.text
    key = json.loads((human / "key.json").read_text())
    assert made.json()["pairs"] == len(key["pairs"]) == 9 and (human / "pairs.csv").is_file()
    assert client.post("/api/rate/export", json={"run": REL}).status_code == 409  # never over an export
    # The key says which side is the fine-tuned model: a rater on /rate must not be able to open it.
    assert client.get(f"/files/{REL}/human/key.json").status_code == 404
    assert client.get(f"/files/{REL}/human/pairs.csv").status_code == 200

    page = client.get("/rate", params={"run": REL})
    ids = list(key["pairs"])
    assert all(f"data-id='{pid}'" in page.text for pid in ids) and "<script>" not in page.text
    rater = "=Ann Lee"  # a formula-like name: escaped in the file as the form escapes it
    for pid, choice in zip(ids[:3], ("A", "B", "A")):
        saved = client.post("/api/rate/rating", json={"run": REL, "rater": rater, "id": pid, "choice": choice})
        assert saved.status_code == 200, saved.text
    again = client.post("/api/rate/rating", json={"run": REL, "rater": rater, "id": ids[0], "choice": "tie"})
    assert again.json()["ratings"] == 3 and again.json()["file"] == "ratings-_Ann_Lee.csv"
    path = human / "ratings-_Ann_Lee.csv"
    assert path.read_text() == (f'id,rater,choice\n{ids[0]},"\'=Ann Lee",tie\n{ids[1]},"\'=Ann Lee",B\n'
                                f'{ids[2]},"\'=Ann Lee",A\n')
    assert [r["rater"] for r in read_ratings(path)] == [rater] * 3
    ours = json.loads((human / "results.json").read_text())
    assert ours == again.json()["results"] and ours["pooled"]["ratings"] == 3
    (human / "results.json").unlink()
    cli = CliRunner().invoke(cli_app, ["human", "import", str(path), "--key", str(human / "key.json")])
    assert cli.exit_code == 0, cli.output
    assert json.loads((human / "results.json").read_text()) == ours
    choices = client.get("/api/rate/ratings", params={"run": REL, "rater": rater}).json()["choices"]
    assert choices == {ids[0]: "tie", ids[1]: "B", ids[2]: "A"}
    assert "Results" in client.get("/rate", params={"run": REL}).text


def test_bad_ratings_and_paths_are_refused(root, client):
    if not (root / REL / "human" / "key.json").is_file():
        assert client.post("/api/rate/export", json={"run": REL}).status_code == 200
    bad = [{"run": REL, "rater": "x", "id": "p9999", "choice": "A"},
           {"run": REL, "rater": "x", "id": "p0001", "choice": "C"},
           {"run": REL, "rater": " ", "id": "p0001", "choice": "A"},
           {"run": REL, "rater": "x" * 101, "id": "p0001", "choice": "A"}]
    for body in bad:
        assert client.post("/api/rate/rating", json=body).status_code == 400, body
    for rel in ("../x", "/etc", "runs/../../x"):
        assert client.get("/rate", params={"run": rel}).status_code == 404
        assert client.post("/api/rate/rating", json={"run": rel, "rater": "x", "id": "p0001",
                                                     "choice": "A"}).status_code == 404
    assert client.post("/api/rate/rating", json={"run": REL, "rater": "x", "id": "p0001", "choice": "A"},
                       headers={"X-Tunesmith-CSRF": "wrong"}).status_code == 403
    assert not (root / REL / "human" / "ratings-x.csv").exists()
