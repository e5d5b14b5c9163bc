"""Live quality on feedback-labelled traffic (serve/quality.py): the Wilson and bootstrap intervals,
windows and their verdicts on a real SQLite request log, the run_dir filter, the server's gauges,
the TunesmithQualityDrop rule under promtool, and `tunesmith monitor` on a tiny trained run."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import PROJECT, make_texts, write_jsonl
from tunesmith.cli import app as cli
from tunesmith.evaluate.human import wilson
from tunesmith.serve import quality as q
from tunesmith.serve.alerts import write_monitoring
from tunesmith.serve.metrics import ServeMetrics
from tunesmith.serve.monitoring import CountedUpdate
from tunesmith.serve.store import LabelledRequest, RequestLog
from tunesmith.tasks.metrics import rouge_l_pair

runner = CliRunner()
NOW = 1_700_000_000.0  # in the past: the log refuses times more than a day ahead of the clock
H = 3600.0
CONFIG = """name: fake
model: /not/needed
task:
  type: {task}
data:
  train: train.jsonl
objective:
  metric: {metric}
monitor:
  max_quality_drop: {drop}
  min_labelled: {min_labelled}
  update_every: 3
"""


def _fake_run(folder: Path, task="classification", metric="accuracy", accepted: float | None = 0.95,
              drop=0.05, min_labelled=10) -> Path:
    """A run directory with what live quality reads: config.yaml and summary.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(CONFIG.format(task=task, metric=metric, drop=drop,
                                                      min_labelled=min_labelled), encoding="utf-8")
    if accepted is not None:
        live = q.live_metric(task, metric)
        (folder / "summary.json").write_text(json.dumps({"metrics": {"finetuned": {live: accepted}}}))
    return folder


def _log(db: Path, rows: list[tuple], run_dir) -> None:
    """rows: (hours_ago, output, verdict) with verdict {label|correction|rating: ...} or None;
    each row is logged through RequestLog, its verdict stored with add_feedback."""
    log = RequestLog(db)
    try:
        for hours_ago, output, verdict in rows:
            rid = uuid.uuid4().hex
            log.write([{"route": "/v1/classify", "input": "some text", "output": output, "label": output,
                        "request_id": rid, "run_dir": None if run_dir is None else str(run_dir)}])
            with sqlite3.connect(db) as con:  # the log stamps "now": move the row back in time
                con.execute("UPDATE requests SET ts = ? WHERE request_id = ?", (NOW - hours_ago * H, rid))
            if verdict is not None:
                log.add_feedback(rid, **verdict)
    finally:
        log.close()


def _target(run: Path) -> q.QualityTarget:
    target = q.quality_target(run)
    assert target is not None
    return target


# -- the intervals ------------------------------------------------------------------------------------
def test_wilson_interval_matches_the_textbook_and_statsmodels():
    from statsmodels.stats.proportion import proportion_confint

    assert wilson(81, 263) == (0.2553, 0.3662)  # Newcombe (1998), Stat. Med. 17:857, method 3
    for k, n in [(0, 10), (1, 10), (25, 40), (40, 40), (7, 300), (150, 300)]:
        low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
        assert wilson(k, n) == pytest.approx((low, high), abs=6e-5), (k, n)


def test_bootstrap_interval_of_a_per_request_metric_matches_scipy():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    words = ["alpha beta gamma", "alpha beta", "delta", "gamma beta alpha epsilon", "zeta eta"]
    truths = [words[i] for i in rng.integers(0, len(words), 400)]
    answers = [words[i] for i in rng.integers(0, len(words), 400)]
    value, low, high = q.bootstrap_interval(truths, answers, "rouge_l")
    scores = np.array([rouge_l_pair(t, a) for t, a in zip(truths, answers)])
    ref = bootstrap((scores,), np.mean, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert value == pytest.approx(scores.mean(), abs=1e-4)
    assert low == pytest.approx(ref.low, abs=0.01) and high == pytest.approx(ref.high, abs=0.01)
    assert q.bootstrap_interval(["a b"] * 30, ["a b"] * 30, "rouge_l") == (1.0, 1.0, 1.0)
    corpus = q.bootstrap_interval(truths[:60], answers[:60], "chrf", resamples=200)  # resampled corpus figure
    assert corpus[1] <= corpus[0] <= corpus[2]


def test_live_metric_per_task():
    assert q.live_metric("classification", "f1_macro") == "accuracy"  # ratings cannot give macro-F1
    assert q.live_metric("generation", "rouge_l") == "rouge_l"
    assert q.live_metric("chat", "preference_accuracy") == "exact_match"  # a pair figure: not on answers
    assert q.live_metric("text", "perplexity") is None


# -- windows and verdicts -----------------------------------------------------------------------------
def test_windows_verdicts_and_the_drop_alert(tmp_path):
    run = _fake_run(tmp_path / "run", accepted=0.95, drop=0.05, min_labelled=10)
    rows = ([(1, "sports", {"label": "sports"})] * 10 + [(2, "sports", {"label": "politics"})] * 4
            + [(3, "sports", {"rating": 1})] * 3 + [(4, "sports", {"rating": 0})] * 3   # latest: 13 of 20 right
            + [(30, "sports", {"rating": 1})] * 30                                        # 24-48 h ago: all right
            + [(60, "sports", {"correction": "politics"})] * 9                            # 48-72 h: 9, too few
            + [(5, "sports", None)] * 50)                                                 # no verdict: not counted
    _log(tmp_path / "log.db", rows, run)
    live = q.live_quality(tmp_path / "log.db", _target(run), now=NOW)
    latest, day2, day3 = live.windows
    assert (live.metric, live.interval, live.accepted, live.threshold) == ("accuracy", "Wilson", 0.95, 0.9)
    assert (latest.n, latest.value, (latest.ci_low, latest.ci_high)) == (20, 0.65, wilson(13, 20))
    assert latest.verdict and latest.ci_high < 0.9 and latest.drop_alert and live.drop_alert
    assert (day2.n, day2.value, day2.verdict, day2.drop_alert) == (30, 1.0, True, False)
    assert (day3.n, day3.value, day3.verdict, day3.drop_alert) == (9, 0.0, False, False)  # low, but no verdict
    assert math.isclose(latest.end - latest.start, 24 * H) and latest.end == NOW and day3.end == NOW - 48 * H
    assert live.verdicts == 59
    only_recent = q.live_quality(tmp_path / "log.db", _target(run), now=NOW, since_hours=24)
    assert [w.n for w in only_recent.windows] == [20]
    # --since is exact, never widened to whole windows: 2 h holds the rows of 1 h ago, half an hour none
    assert [w.n for w in q.live_quality(tmp_path / "log.db", _target(run), now=NOW, since_hours=0.5).windows] == [0]
    part = q.live_quality(tmp_path / "log.db", _target(run), now=NOW, since_hours=36)
    assert [w.n for w in part.windows] == [20, 30] and part.windows[1].start == NOW - 36 * H
    assert q.quality_lines(q.live_quality(tmp_path / "log.db", _target(run), now=NOW,
                                          since_hours=2).to_dict())[0].startswith("live accuracy (last 2 h)")


@pytest.mark.parametrize("column,value,says", [("input", b"\x00raw", "'input' is bytes"),
                                               ("ts", "yesterday", "'ts' is str"),
                                               ("confidence", "high", "'confidence' is str"),
                                               # values tunesmith never writes: infinite or out of range
                                               ("confidence", 1e999, "'confidence' is inf"),
                                               ("confidence", 1.5, "'confidence' is 1.5"),
                                               ("ts", 1e12, "'ts' is 1000000000000.0"),
                                               ("input_cut", 7, "'input_cut' is 7")])
def test_a_hand_edited_request_log_row_is_named_not_an_internal_error(tmp_path, column, value, says):
    """monitor failed with `ValueError: text input must be of type str` (a BLOB input) or numpy's
    `add.reduce` TypeError (a text ts): SQLite keeps whatever an edit puts in a column."""
    from tunesmith.errors import InputError
    from tunesmith.serve.store import recent

    run = _fake_run(tmp_path / "run", accepted=0.9)
    _log(tmp_path / "log.db", [(1, "sports", {"label": "sports"})] * 3, run)
    with sqlite3.connect(tmp_path / "log.db") as con:
        con.execute(f"UPDATE requests SET {column} = ? WHERE id = 2", (value,))
    for read in (lambda: recent(tmp_path / "log.db", 10),
                 lambda: q.live_quality(tmp_path / "log.db", _target(run), now=NOW)):
        with pytest.raises(InputError) as info:
            read()
        assert says in info.value.line() and str(tmp_path / "log.db") in info.value.line()


@pytest.mark.parametrize("edit,says", [("rating = 5", "'rating' is 5"),
                                       ("label = NULL", "none or several of label, correction, rating"),
                                       ("correction = 'x'", "none or several of label, correction, rating")])
def test_a_hand_edited_verdict_is_named_not_counted_as_a_wrong_answer(tmp_path, edit, says):
    """A verdict with no label, correction or rating (or a rating of 5) counted as a labelled wrong answer."""
    from tunesmith.errors import InputError

    run = _fake_run(tmp_path / "run", accepted=0.9)
    _log(tmp_path / "log.db", [(1, "sports", {"label": "sports"})] * 3, run)
    with sqlite3.connect(tmp_path / "log.db") as con:
        con.execute(f"UPDATE feedback SET {edit} WHERE request_id = (SELECT MIN(request_id) FROM feedback)")
    with pytest.raises(InputError) as info:
        q.live_quality(tmp_path / "log.db", _target(run), now=NOW)
    assert says in info.value.line()


def test_threshold_is_strict_and_min_labelled_decides_the_verdict(tmp_path):
    _, high = wilson(8, 10)
    db = tmp_path / "log.db"
    _log(db, [(1, "a", {"rating": 1})] * 8 + [(1, "a", {"rating": 0})] * 2, None)
    cases = {(round(high + 0.05 + 0.001, 4), 10): True,    # upper end just under accepted - drop: alert
             (round(high + 0.05 - 0.001, 4), 10): False,   # just over: none
             (0.999, 11): False}                          # far under, but one labelled request short
    for (accepted, min_labelled), alert in cases.items():
        run = _fake_run(tmp_path / f"run-{accepted}-{min_labelled}", accepted=accepted, min_labelled=min_labelled)
        w = q.live_quality(db, _target(run), now=NOW).latest
        assert (w.n, w.verdict, w.drop_alert) == (10, min_labelled == 10, alert), (accepted, min_labelled)


def test_only_rows_answered_by_the_run_count(tmp_path, monkeypatch):
    run, other = _fake_run(tmp_path / "run"), _fake_run(tmp_path / "other")
    db = tmp_path / "log.db"
    _log(db, [(1, "a", {"rating": 1})] * 4, run)                                       # this run
    _log(db, [(1, "a", {"rating": 1})] * 3, None)                                      # an older server: counted
    _log(db, [(1, "a", {"rating": 0})] * 5, other)                                     # another run: not
    monkeypatch.chdir(tmp_path)
    _log(db, [(1, "a", {"rating": 1})] * 2, Path("run"))                               # the same run, relative
    _log(db, [(1, "a", {"rating": 1})] * 1, tmp_path / "other" / ".." / "run")         # and not normalised
    assert q.live_quality(db, _target(run), now=NOW).latest.n == 10
    assert q.live_quality(db, _target(other), now=NOW).latest.n == 8


def test_generation_metrics_score_references_and_ratings(tmp_path):
    db = tmp_path / "log.db"
    rows = ([(1, "the cat sat", {"correction": "the cat sat down"})] * 6
            + [(1, "a dog", {"label": "a dog"})] * 4
            + [(1, "whatever", {"rating": 1})] * 5 + [(1, "nonsense", {"rating": 0})] * 5)
    _log(db, rows, None)
    graded = q.live_quality(db, _target(_fake_run(tmp_path / "g", "generation", "rouge_l", 0.9, min_labelled=5)),
                            now=NOW)
    w = graded.latest
    expected = (6 * rouge_l_pair("the cat sat down", "the cat sat") + 4) / 10
    assert (graded.metric, graded.interval, w.n, w.unscored) == ("rouge_l", "bootstrap", 10, 10)
    assert w.value == pytest.approx(expected, abs=1e-4) and w.ci_low <= w.value <= w.ci_high <= 1
    exact = q.live_quality(db, _target(_fake_run(tmp_path / "e", "generation", "exact_match", 0.9, min_labelled=5)),
                           now=NOW).latest
    # exact_match: correction misses (0), label hits (4), rating 1 hits (5), rating 0 misses: 9 of 20
    assert (exact.n, exact.unscored, exact.value, (exact.ci_low, exact.ci_high)) == (20, 0, 0.45, wilson(9, 20))
    assert exact.drop_alert


def test_no_accepted_figure_no_alert_and_an_empty_log(tmp_path):
    run = _fake_run(tmp_path / "run", accepted=None, min_labelled=1)
    db = tmp_path / "log.db"
    RequestLog(db).close()
    empty = q.live_quality(db, _target(run), now=NOW)
    assert len(empty.windows) == 1 and empty.latest.n == 0 and empty.latest.value is None and empty.verdicts == 0
    assert q.quality_lines(empty.to_dict()) == [f"live accuracy: {q.NO_FEEDBACK}"]
    _log(db, [(1, "a", {"rating": 0})] * 5, run)
    live = q.live_quality(db, _target(run), now=NOW)
    assert live.latest.verdict and not live.drop_alert and live.threshold is None
    assert "no accepted figure" in q.quality_lines(live.to_dict())[0]


# -- the server's gauges ------------------------------------------------------------------------------
def _gauge(metrics: ServeMetrics, name: str, metric: str = "accuracy") -> float | None:
    for line in metrics.exposition().decode().splitlines():
        if line.startswith(f'{name}{{metric="{metric}"}} '):
            return float(line.split()[-1])
    return None


def test_quality_watch_sets_the_gauges(tmp_path, monkeypatch, caplog):
    run = _fake_run(tmp_path / "run", accepted=0.95, min_labelled=10)
    db = tmp_path / "log.db"
    RequestLog(db).close()
    metrics = ServeMetrics()
    watch = q.QualityWatch(_target(run), db, metrics, refresh_s=None)  # scrapes (_gauge) start no update
    assert _gauge(metrics, "tunesmith_accepted_quality") == 0.95 and _gauge(metrics, "tunesmith_live_quality") is None
    watch.update_now(now=NOW)
    assert math.isnan(_gauge(metrics, "tunesmith_live_quality_ci_high"))  # no figure: NaN, which never alerts
    assert _gauge(metrics, "tunesmith_live_quality_labelled") == 0
    _log(db, [(1, "a", {"rating": 1})] * 6 + [(1, "a", {"rating": 0})] * 6, run)
    watch.update_now(now=NOW)
    low, high = wilson(6, 12)
    assert (_gauge(metrics, "tunesmith_live_quality"), _gauge(metrics, "tunesmith_live_quality_ci_low"),
            _gauge(metrics, "tunesmith_live_quality_ci_high"), _gauge(metrics, "tunesmith_live_quality_labelled")) \
        == (0.5, low, high, 12)
    # seen(): every monitor.update_every (3) verdicts, in the background; a failure is counted and logged
    calls = []
    monkeypatch.setattr(watch, "update_now", lambda: calls.append(1))
    watch.seen(2)
    watch.close()
    assert calls == []
    watch.seen(1)
    watch.close()
    assert calls == [1]
    monkeypatch.setattr(watch, "update_now", lambda: (_ for _ in ()).throw(sqlite3.OperationalError("locked")))
    with caplog.at_level(logging.ERROR, logger="tunesmith.serve"):
        watch.seen(3)
        watch.close()
    assert "quality update failed: OperationalError" in caplog.text
    assert "tunesmith_quality_update_failures_total 1.0" in metrics.exposition().decode()


def _two_runs_one_log(tmp_path):
    """A classification champion and a generation challenger whose answers share one log, a minute old."""
    champion = _fake_run(tmp_path / "champion", accepted=0.95)
    challenger = _fake_run(tmp_path / "challenger", "generation", "rouge_l", accepted=0.6, min_labelled=1)
    db = tmp_path / "log.db"
    _log(db, [(0.1, "a b", {"rating": 1})] * 3, champion)
    _log(db, [(0.1, "a b", {"correction": "a b"})] * 2, challenger)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE requests SET ts = ?", (time.time() - 60,))
    return champion, challenger, db


def test_quality_watch_follows_a_swapped_run(tmp_path):
    champion, challenger, db = _two_runs_one_log(tmp_path)
    metrics = ServeMetrics()
    watch = q.QualityWatch(_target(champion), db, metrics, refresh_s=None)  # scrapes (_gauge) start no update
    assert watch.follow(challenger)
    watch.close()
    assert _gauge(metrics, "tunesmith_accepted_quality", "rouge_l") == 0.6
    assert _gauge(metrics, "tunesmith_live_quality_labelled", "rouge_l") == 2  # the challenger's answers only
    assert _gauge(metrics, "tunesmith_accepted_quality") is None  # the champion's series are gone
    assert not watch.follow(tmp_path / "bare") and watch.target.run_dir == challenger


def _rows(n: int, right_from: int, hours_ago: float = 1) -> list[LabelledRequest]:
    """n verdicts (rouge_l: references), oldest first: answers wrong before index `right_from`, right after."""
    return [LabelledRequest(f"r{i}", NOW - hours_ago * H - (n - i), "/v1/completions", "in",
                            "the cat sat" if i >= right_from else "zzz", None, None, None, "the cat sat", None,
                            NOW) for i in range(n)]


def test_a_large_window_uses_only_its_newest_scored_requests(tmp_path, monkeypatch):
    """12,000 verdicts in a window: the figure is on the newest MAX_SCORED (5,000), the rest counted."""
    run = _fake_run(tmp_path / "g", "generation", "rouge_l", 0.9, min_labelled=5)
    rows = _rows(12_000, right_from=7_000)  # the newest 5,000 right, the 7,000 before them wrong
    monkeypatch.setattr(q, "labelled", lambda db, since=None: list(reversed(rows)))  # any order in
    live = q.live_quality(tmp_path / "log.db", _target(run), now=NOW)
    w = live.latest
    assert (w.n, w.left_out, w.value, w.ci_low, w.ci_high) == (q.MAX_SCORED, 7_000, 1.0, 1.0, 1.0)
    assert live.verdicts == 12_000
    assert "on the newest 5000 of 12000 labelled requests" in q.quality_lines(live.to_dict())[0]
    bigger = _fake_run(tmp_path / "m", "generation", "rouge_l", 0.9, min_labelled=6_000)
    w = q.live_quality(tmp_path / "log.db", _target(bigger), now=NOW).latest  # min_labelled above the cap wins
    assert (w.n, w.left_out, w.verdict) == (6_000, 6_000, True)


class _SpyRng:
    """A numpy Generator recording the size of every index draw."""

    def __init__(self, seed=0):
        self.rng, self.sizes = np.random.default_rng(seed), []

    def integers(self, low, high, size):
        self.sizes.append(size)
        return self.rng.integers(low, high, size)


def test_resampling_draws_bounded_chunks_whatever_the_sample_size():
    n = 100_000
    spy = _SpyRng()
    sums = q.resampled_sums(np.ones((n, 1)), 25, spy)
    assert sums.shape == (25, 1) and (sums == n).all()
    assert max(math.prod(size) for size in spy.sizes) <= q.CHUNK_DRAWS and sum(s[0] for s in spy.sizes) == 25
    values = np.arange(20.0)[:, None]
    spy = _SpyRng()
    draws = q.resampled_sums(values, 3000, spy)[:, 0] / 20  # small n: few chunks, the bootstrap's mean
    assert len(spy.sizes) == 1 and draws.mean() == pytest.approx(values.mean(), abs=0.1)


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_corpus_metrics_resample_summed_statistics_exactly(metric):
    """BLEU and chrF per resample from summed per-request statistics: the same figure as sacrebleu on
    the resampled requests (so their bootstrap never reruns sacrebleu over every row)."""
    from tunesmith.tasks.metrics import METRICS

    rng = np.random.default_rng(5)
    words = ["the cat sat on the mat", "a dog runs in the park", "hello world", "red card for the keeper"]
    truths = [words[i] for i in rng.integers(0, 4, 80)]
    answers = [" ".join(words[i].split()[:j]) for i, j in zip(rng.integers(0, 4, 80), rng.integers(1, 6, 80))]
    per_request, score = q._corpus_statistics(metric, truths, answers)
    assert per_request.shape[0] == 80
    for _ in range(5):
        idx = rng.integers(0, 80, 80)
        assert score(per_request[idx].sum(axis=0)) == pytest.approx(
            METRICS[metric].fn([truths[i] for i in idx], [answers[i] for i in idx]), abs=1e-9)
    value, low, high = q.bootstrap_interval(truths, answers, metric)
    assert value == round(METRICS[metric].fn(truths, answers), 4) and low < value < high


def test_imported_verdicts_and_passing_time_reach_the_gauges_on_a_scrape(tmp_path):
    """No verdict through the API: a scrape finding the gauges older than refresh_s recomputes them in
    the background (imported verdicts come in, requests past the window go out); never after close()."""
    run = _fake_run(tmp_path / "run", accepted=0.95, min_labelled=1)
    db = tmp_path / "log.db"
    _log(db, [(0, "a", {"rating": 1})] * 3, run)
    clock = {"t": 0.0}
    metrics = ServeMetrics()
    watch = q.QualityWatch(_target(run), db, metrics, refresh_s=10, clock=lambda: clock["t"])

    def scrape(at: float) -> float | None:
        clock["t"] = at
        metrics.exposition()  # starts the refresh; the next scrape shows its figures
        watch.wait()
        return _gauge(metrics, "tunesmith_live_quality_labelled")

    def answered_now():
        with sqlite3.connect(db) as con:
            con.execute("UPDATE requests SET ts = ?", (time.time() - 60,))
    answered_now()
    assert scrape(0) == 3  # never updated: the first scrape starts one
    _log(db, [(0, "a", {"rating": 0, "source": "import"})] * 2, run)  # `tunesmith feedback import`: no seen()
    answered_now()
    assert scrape(9.9) == 3 and watch.last_started == 0  # fresh enough: no update
    assert scrape(10) == 5 and watch.last_started == 10
    with sqlite3.connect(db) as con:  # the window moves on: every request is now 2 days old
        con.execute("UPDATE requests SET ts = ?", (time.time() - 48 * H,))
    assert scrape(25) == 0 and math.isnan(_gauge(metrics, "tunesmith_live_quality"))
    watch.close()
    assert not watch.refresh() and scrape(100) == 0 and watch.last_started == 25


def test_a_request_while_an_update_runs_reruns_it_once(tmp_path):
    """start() or `every` events during an update: one more update right after it, not none."""
    gate, calls = threading.Event(), []

    class Slow(CountedUpdate):
        def update_now(self):
            calls.append(1)
            gate.wait(10)
    slow = Slow(2, lambda: None)
    assert slow.start() and not slow.start()  # busy: owed a rerun
    slow.seen(2)  # due while busy: the same rerun
    gate.set()
    slow.wait()
    assert len(calls) == 2
    slow.seen(1)
    slow.wait()
    assert len(calls) == 2 and slow.start()
    slow.close()
    assert len(calls) == 3


def test_a_swap_during_a_running_update_ends_on_the_new_runs_figures(tmp_path, monkeypatch):
    champion, challenger, db = _two_runs_one_log(tmp_path)
    entered, gate, real = threading.Event(), threading.Event(), q.live_quality

    def slow_first(*args, **kwargs):
        if not entered.is_set():
            entered.set()
            gate.wait(10)
        return real(*args, **kwargs)
    monkeypatch.setattr(q, "live_quality", slow_first)
    metrics = ServeMetrics()
    watch = q.QualityWatch(_target(champion), db, metrics, refresh_s=None)  # scrapes (_gauge) start no update
    assert watch.start() and entered.wait(10)  # the champion's update is running
    assert watch.follow(challenger)  # swapped meanwhile
    gate.set()
    watch.close()
    assert _gauge(metrics, "tunesmith_live_quality_labelled", "rouge_l") == 2  # the rerun: the challenger's
    assert _gauge(metrics, "tunesmith_live_quality_labelled") is None  # the old update wrote nothing back


class _Engine:
    """An engine in the shape of an upstream one, serving a run directory (no model needed)."""

    name, variant, load_seconds, threads, labels, scores_labels = "echo", "fp32", 0.0, 1, None, False

    def __init__(self, run_dir):
        self.run_dir = run_dir

    def close(self) -> None:
        pass


def test_build_state_sets_the_gauges_at_startup_and_closes_the_watch(tmp_path):
    from tunesmith.config import ServeConfig
    from tunesmith.serve.state import build_state

    run = _fake_run(tmp_path / "run", accepted=0.9, min_labelled=2)
    db = tmp_path / "log.db"
    _log(db, [(0.5, "a", {"rating": 1})] * 3 + [(0.5, "a", {"rating": 0})], run)
    with sqlite3.connect(db) as con:  # answered just now, so the server's own clock puts them in its latest window
        con.execute("UPDATE requests SET ts = ?", (time.time() - 60,))
    state = build_state(_Engine(run), ServeConfig(), [], db)
    state.quality.close()  # the startup update
    assert _gauge(state.metrics, "tunesmith_live_quality") == 0.75
    assert _gauge(state.metrics, "tunesmith_live_quality_labelled") == 4
    state.close()
    for engine, log in ((_Engine(None), db), (_Engine(run), None)):  # a bare model, no request log: none
        other = build_state(engine, ServeConfig(), [], log)
        assert other.quality is None
        other.close()


# -- the alert rule under promtool --------------------------------------------------------------------
@pytest.fixture(scope="module")
def promtool():
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("TUNESMITH_REQUIRE_PROMETHEUS") == "1":
            pytest.fail("promtool not found (Debian package prometheus); make test installs it")
        pytest.skip("promtool not installed")
    return tool


def _promtool(promtool, *args, cwd=None):
    return subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("drop,min_labelled", [(0.05, 30), (0.2, 5)])
def test_quality_drop_rule_passes_its_promtool_tests(tmp_path, promtool, drop, min_labelled):
    write_monitoring(tmp_path, "tiny", 500, max_quality_drop=drop, min_labelled=min_labelled)
    rules = yaml.safe_load((tmp_path / "alerts.yml").read_text())["groups"][0]["rules"]
    rule = next(r for r in rules if r["alert"] == "TunesmithQualityDrop")
    assert f"- {drop:g})" in rule["expr"] and f">= {min_labelled}" in rule["expr"]
    checked = _promtool(promtool, "check", "rules", str(tmp_path / "alerts.yml"))
    assert checked.returncode == 0 and "5 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = _promtool(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    # The tests can fail: without the min_labelled clause, a thin window pages and promtool says so.
    rule["expr"] = rule["expr"].split(" and ")[0]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump({"groups": [{"name": "tunesmith", "rules": rules}]}))
    broken = _promtool(promtool, "test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert broken.returncode != 0 and "rouge_l" in broken.stdout + broken.stderr


def test_dashboard_has_a_live_vs_accepted_panel(tmp_path):
    write_monitoring(tmp_path, "tiny", 500)
    panels = json.loads((tmp_path / "grafana-dashboard.json").read_text())["panels"]
    panel = next(p for p in panels if p["title"].startswith("Live quality"))
    assert [t["expr"] for t in panel["targets"]] == ["tunesmith_live_quality", "tunesmith_live_quality_ci_low",
                                                     "tunesmith_live_quality_ci_high", "tunesmith_accepted_quality"]
    assert len({t["refId"] for t in panel["targets"]}) == 4


# -- tunesmith monitor on a tiny trained run ----------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("live")
    write_jsonl(folder / "train.jsonl", make_texts(30, 1))
    write_jsonl(folder / "test.jsonl", make_texts(12, 2))
    monitor = "monitor:\n  min_labelled: 20\n  max_quality_drop: 0.1\n  update_every: 2\n"
    (folder / "project.yaml").write_text(PROJECT.format(model=tiny_model, method="lora") + monitor, encoding="utf-8")
    result = runner.invoke(cli, ["run", str(folder / "project.yaml"), "--out", str(folder / "run"), "--quiet"])
    assert result.exit_code in (0, 3), result.output
    return folder / "run"


def test_monitor_reports_live_quality_and_recommends_retraining(trained):
    db = trained / "monitor" / "requests.db"
    texts = make_texts(30, 9)
    accepted = json.loads((trained / "summary.json").read_text())["metrics"]["finetuned"]["accuracy"]
    log = RequestLog(db)
    log.write([{"route": "/v1/classify", "input": r["text"], "output": "sports", "label": "sports",
                "request_id": f"r{i}", "run_dir": str(trained)} for i, r in enumerate(texts)])
    log.close()
    plain = runner.invoke(cli, ["monitor", str(trained), "--window", "10"])
    assert plain.exit_code == 0 and f"live accuracy: {q.NO_FEEDBACK}" in plain.output, plain.output
    log = RequestLog(db)
    for i in range(30):  # every answer wrong: far under the accepted figure minus 0.1
        log.add_feedback(f"r{i}", label="no-such-label")
    log.close()
    result = runner.invoke(cli, ["monitor", str(trained), "--window", "10", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    live = report["quality"]
    assert live["metric"] == "accuracy" and live["accepted"] == accepted and live["drop_alert"]
    assert live["windows"][0]["n"] == 30 and live["windows"][0]["value"] == 0.0
    assert report["recommendation"] == "retrain" and "tunesmith retrain" in report["reason"]
    text = runner.invoke(cli, ["monitor", str(trained), "--window", "10"]).output
    assert "live accuracy (last 24 h): 0 [0, 0.1135] on 30 labelled requests" in text, text
    assert f"QUALITY DROP (upper end 0.1135 < {accepted:.4g} - 0.1)" in text and "recommendation: retrain" in text
    bad = runner.invoke(cli, ["monitor", str(trained), "--since", "0"])
    assert bad.exit_code == 2 and "error: bad --since 0" in bad.output
    for since in ("inf", "nan"):  # inf overflowed counting windows (exit 1, a traceback)
        bad = runner.invoke(cli, ["monitor", str(trained), "--since", since])
        assert bad.exit_code == 2 and f"error: bad --since {since}" in bad.output, bad.output
    bad = runner.invoke(cli, ["monitor", str(trained), "--window", "99999999999999999999"])  # SQLite's int overflowed
    assert bad.exit_code == 2 and "error: bad window" in bad.output and ", --window, " in bad.output, bad.output


def test_feedback_through_the_server_moves_the_gauges(trained, tmp_path):
    from fastapi.testclient import TestClient

    from tunesmith.config import ServeConfig
    from tunesmith.serve.app import create_app
    from tunesmith.serve.service import load_service

    app = create_app(load_service(trained), ServeConfig(), [], tmp_path / "requests.db")
    with TestClient(app) as c:
        answers = c.post("/v1/classify", json={"texts": ["red card", "budget vote", "new goalkeeper"]}).json()
        ids = [r["request_id"] for r in answers["results"]]
        metrics = app.state.metrics
        for rid in ids[:2]:  # monitor.update_every 2: the second verdict starts an update
            assert c.post("/v1/feedback", json={"request_id": rid, "rating": 0}).status_code == 200
    # leaving the client closed the app, which let the update finish
    assert _gauge(metrics, "tunesmith_live_quality_labelled") == 2 and _gauge(metrics, "tunesmith_live_quality") == 0
    assert _gauge(metrics, "tunesmith_accepted_quality") is not None


def test_an_answer_served_with_a_leading_space_is_scored_as_eval_reads_it():
    """A classifier answering through /v1/completions keeps the space before its label (" positive"):
    every rated-right answer counted as wrong, and a QUALITY DROP fired on a model that was right."""
    from tunesmith.serve.store import LabelledRequest

    rated = [LabelledRequest(f"r{i}", NOW, "/v1/completions", "x", " positive", None, None, None, None, 1, NOW)
             for i in range(20)]
    labelled = [LabelledRequest(f"l{i}", NOW, "/v1/completions", "x", " positive", None, None, "positive", None,
                                None, NOW) for i in range(5)]
    assert q.figure(*q.scored(rated + labelled, "accuracy")[:2], "accuracy")[0] == 1.0
