"""Live quality: how good the served run's answers are on traffic whose truth came back as feedback
(POST /v1/feedback, `tunesmith feedback import`), per time window of `monitor.window_hours`, against
the test figure the run was accepted on (summary.json).

Which requests count: those the log records as answered by this run (its `run_dir`, compared as
resolved paths), and those with no run recorded: a log written by a server from before runs were
recorded, which served only the run it lives in (the default log is RUN_DIR/monitor/requests.db).
A request falls in the window in which it was answered, whenever its verdict arrived.

The figure:
- classification: accuracy, the answer compared with the verdict's label (or correction); a rating 1
  counts right, a rating 0 wrong; Wilson 95% interval. It is compared with the test accuracy whatever
  `objective.metric` is: macro-F1 and the like cannot be computed from ratings.
- generation and chat: the objective metric between the answer and the truth (the label or
  correction, or the answer itself when rated 1). exact_match is right/wrong per request: a rating 0
  counts wrong (a wrong answer matches no true one) and the interval is Wilson's. A graded metric
  (token_f1, rouge_l, bleu, chrf) needs a reference text to give partial credit, so verdicts that are
  only a rating (1 or 0) are left out of it and counted as `unscored`: scoring ratings 1 as 1.0 and
  dropping ratings 0 would push the figure up, and scoring them 1.0 and 0.0 would put it on another
  scale than the test figure. Its interval is a percentile bootstrap over requests. An objective not
  measured on answers (a preference-pair figure, a lower-is-better metric) is replaced by exact_match.
- text runs: no live quality (there is no answer to judge).

Bounded work: a window's figure is computed on at most its newest MAX_SCORED (5,000) scored requests
(or `monitor.min_labelled`, when that is larger), the older ones counted in the window's `left_out`:
a Wilson interval on 5,000 requests is at most +-1.4 points wide, so more would buy little and cost
the server's memory and CPU. The bootstrap draws its resamples CHUNK_DRAWS indices at a time (8 MB),
whatever the window holds. BLEU and chrF are not recomputed per resample (that is sacrebleu over every
row, hundreds of times, holding the GIL beside the event loop): their per-request n-gram statistics
are extracted once and each resample sums them, which gives exactly the corpus figure of the resampled
requests (sacrebleu's own paired bootstrap works this way), so the full RESAMPLES are cheap. Per-sentence
BLEU or chrF would be cheaper still but on another scale than the accepted corpus figure. Only a
user's corpus metric is recomputed per resample, and then only CORPUS_RESAMPLES times.

A window has a verdict with at least `monitor.min_labelled` scored requests; its drop alert is on
when even the upper end of the interval is below `accepted - monitor.max_quality_drop`.

The server keeps gauges of the latest window (`QualityWatch`): recomputed every
`monitor.update_every` verdicts that come through the API, and, when a Prometheus scrape finds them
older than REFRESH_S seconds, once more in the background, so verdicts from `tunesmith feedback import`
reach them and old requests leave the window.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tunesmith import fsio
from tunesmith.config import MonitorSettings, load_config
from tunesmith.config.settings import label_form
from tunesmith.evaluate.human import wilson
from tunesmith.registry import METRIC_SPECS, metric_names
from tunesmith.runs import read_summary
from tunesmith.serve.monitoring import CountedUpdate
from tunesmith.serve.store import LabelledRequest, RunMatch, labelled
from tunesmith.tasks.metrics import METRICS

BINARY = ("accuracy", "exact_match")          # right/wrong per request: Wilson interval
PER_REQUEST_MEAN = BINARY + ("token_f1", "rouge_l")  # a mean of per-request scores (resampled cheaply)
FALLBACK_METRIC = "exact_match"
MAX_WINDOWS = 30    # windows read and shown at most (the log's retention bounds them anyway)
MAX_SCORED = 5000   # newest scored requests a window's figure is computed on (see above)
RESAMPLES = 1000
CORPUS_RESAMPLES = 200  # a user's corpus metric, recomputed per resample: fewer of them
CHUNK_DRAWS = 1_000_000  # resample indices drawn at once (8 MB of int64)
REFRESH_S = 60.0    # a scrape finding the server's gauges older than this recomputes them
NO_FEEDBACK = "no feedback yet: POST /v1/feedback or tunesmith feedback import"


@dataclass(frozen=True)
class QualityTarget:
    """What a run's live quality is measured with and compared against."""

    run_dir: Path
    task_type: str
    metric: str
    accepted: float | None   # the run's test figure for `metric` (None: no summary.json to compare with)
    settings: MonitorSettings


@dataclass(frozen=True)
class QualityWindow:
    """Live quality of the requests answered in [start, end) (time.time() seconds)."""

    start: float
    end: float
    n: int                   # scored requests the figure is computed on (the newest MAX_SCORED at most)
    unscored: int            # verdicts a graded metric cannot score (only a rating)
    value: float | None
    ci_low: float | None
    ci_high: float | None
    verdict: bool            # n >= monitor.min_labelled
    drop_alert: bool         # verdict and ci_high < accepted - max_quality_drop
    left_out: int = 0        # older scored requests past MAX_SCORED, not in the figure


@dataclass(frozen=True)
class LiveQuality:
    """Windows newest first; `windows[0]` (`latest`) ends now and is there even when empty."""

    metric: str
    interval: str            # "Wilson" or "bootstrap"
    accepted: float | None
    max_drop: float
    min_labelled: int
    window_hours: float
    windows: list[QualityWindow] = field(default_factory=list)

    @property
    def latest(self) -> QualityWindow:
        return self.windows[0]

    @property
    def threshold(self) -> float | None:
        """The upper end of the live interval must stay at or above this."""
        return None if self.accepted is None else round(self.accepted - self.max_drop, 6)

    @property
    def drop_alert(self) -> bool:
        return self.latest.drop_alert

    @property
    def verdicts(self) -> int:
        return sum(w.n + w.unscored + w.left_out for w in self.windows)

    def to_dict(self) -> dict:
        return {**asdict(self), "threshold": self.threshold, "drop_alert": self.drop_alert,
                "verdicts": self.verdicts}


def quality_target(run_dir: Path) -> QualityTarget | None:
    """The run's live metric, accepted figure and monitor settings; None for a folder without a
    config.yaml (a bare model) or a text run (no answers to judge)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        return None
    project = load_config(run_dir / "config.yaml", check_files=False)
    metric = live_metric(project.task.type, project.objective.metric)
    if metric is None:
        return None
    metrics = read_summary(run_dir).get("metrics") if (run_dir / "summary.json").is_file() else None
    finetuned = metrics.get("finetuned") if isinstance(metrics, dict) else None
    accepted = finetuned.get(metric) if isinstance(finetuned, dict) else None
    if accepted is not None and (not isinstance(accepted, (int, float)) or isinstance(accepted, bool)):
        raise fsio.DamagedFile(run_dir / "summary.json", f"metrics.finetuned.{metric} is not a number",
                               what="not what tunesmith wrote")
    return QualityTarget(run_dir, project.task.type, metric, None if accepted is None else float(accepted),
                         project.monitor)


def live_metric(task_type: str, objective: str) -> str | None:
    """accuracy for classification; the objective (else exact_match) for generation and chat; None otherwise."""
    if task_type == "classification":
        return "accuracy"
    if task_type not in ("generation", "chat"):
        return None
    spec = METRIC_SPECS.get(objective)
    answers = objective in metric_names(task_type) and spec is not None and spec.higher_is_better
    return objective if answers else FALLBACK_METRIC


def scored(rows: list[LabelledRequest], metric: str) -> tuple[list[str], list[str], int]:
    """(truths, answers, unscored) of the rows the metric can score. A rating 0 without a truth
    enters a right/wrong metric as an answer no truth matches (truth None)."""
    truths, answers, unscored = [], [], 0
    for r in rows:
        # The answer as eval reads a prediction: a completion route keeps the space a plain prompt format
        # puts before it (" positive"), which no label or rated-right truth has.
        # NFC on both sides, as labels are read: a model trained on "cafe\u0301" answers it that way.
        answer = label_form((r.output or "").strip())
        truth = None if r.truth is None else label_form(r.truth)
        if metric in BINARY:
            truths.append(truth)
            answers.append(answer)
        elif r.verified:
            truths.append(truth)
            answers.append(answer)
        else:
            unscored += 1
    return truths, answers, unscored


def figure(truths: list, answers: list[str], metric: str, resamples: int = RESAMPLES,
           seed: int = 0) -> tuple[float, float, float]:
    """(value, ci_low, ci_high), 95%: Wilson's interval for a right/wrong metric, else a percentile
    bootstrap over requests. A truth of None (rating 0) scores 0."""
    if metric in BINARY:
        fn = METRICS[metric].fn
        right = sum(t is not None and fn([t], [a]) == 1.0 for t, a in zip(truths, answers))
        low, high = wilson(right, len(truths))
        return round(right / len(truths), 4), low, high
    return bootstrap_interval(truths, answers, metric, resamples, seed)


def bootstrap_interval(truths: list[str], answers: list[str], metric: str, resamples: int = RESAMPLES,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(value, ci_low, ci_high): the metric and its percentile bootstrap interval over requests (one
    sample; evaluate/compare.py's paired bootstrap is for two models on the same requests). Memory
    stays bounded (CHUNK_DRAWS) whatever the number of requests; see the module's docstring."""
    fn, n = METRICS[metric].fn, len(truths)
    rng = np.random.default_rng(seed)
    if metric in PER_REQUEST_MEAN:  # a mean of per-request scores: score once, resample the scores
        scores = np.array([fn([t], [a]) for t, a in zip(truths, answers)], dtype=float)
        value, draws = float(scores.mean()), resampled_sums(scores[:, None], resamples, rng)[:, 0] / n
    elif (stats := _corpus_statistics(metric, truths, answers)) is not None:
        per_request, score = stats  # BLEU, chrF: each resample's corpus figure from summed statistics
        value = score(per_request.sum(axis=0))
        draws = np.array([score(row) for row in resampled_sums(per_request, resamples, rng)])
    else:  # a user's corpus figure: recomputed per resample, fewer of them
        value = float(fn(truths, answers))
        draws = np.empty(min(CORPUS_RESAMPLES, resamples))
        for b in range(len(draws)):
            idx = rng.integers(0, n, n)
            draws[b] = fn([truths[i] for i in idx], [answers[i] for i in idx])
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return round(value, 4), round(float(low), 4), round(float(high), 4)


def resampled_sums(rows: np.ndarray, resamples: int, rng) -> np.ndarray:
    """(resamples, k): sums of `rows` (n, k) over `resamples` bootstrap resamples of its n rows,
    drawn at most CHUNK_DRAWS indices at a time (n = 100k would otherwise mean 800 MB of indices)."""
    n, k = rows.shape
    per_chunk = max(1, CHUNK_DRAWS // n)
    out = np.empty((resamples, k))
    for start in range(0, resamples, per_chunk):
        idx = rng.integers(0, n, (min(per_chunk, resamples - start), n))
        for j in range(k):  # one column at a time: (chunk, n) floats, not (chunk, n, k)
            out[start:start + len(idx), j] = rows[:, j][idx].sum(axis=1)
    return out


def _corpus_statistics(metric: str, truths: list[str], answers: list[str]):
    """(per-request sufficient statistics (n, k), score(summed row) -> 0-1 figure) for BLEU and chrF,
    as tasks/metrics.py computes them (sacrebleu's defaults); None for another metric or a sacrebleu
    without this interface (then the figure is recomputed per resample)."""
    if metric not in ("bleu", "chrf"):
        return None
    import sacrebleu

    scorer = sacrebleu.BLEU() if metric == "bleu" else sacrebleu.CHRF()
    try:
        per_request = np.array(scorer._extract_corpus_statistics(answers, [truths]), dtype=float)
        scorer._compute_score_from_stats(list(per_request[0]))
    except (AttributeError, TypeError):  # sacrebleu's statistics API moved: the slow, exact way
        return None
    return per_request, lambda row: float(scorer._compute_score_from_stats(list(row)).score / 100)


def live_quality(db: Path, target: QualityTarget, now: float | None = None,
                 since_hours: float | None = None) -> LiveQuality:
    """Live quality per window, newest first, from the request log at `db` (at most MAX_WINDOWS
    windows, and only those reaching back `since_hours` when given)."""
    s, now = target.settings, time.time() if now is None else now
    count = MAX_WINDOWS if since_hours is None else max(1, min(MAX_WINDOWS, math.ceil(since_hours / s.window_hours)))
    # --since is exact: the oldest window is cut at it, never widened to a whole window_hours.
    cutoff = now - (count * s.window_hours if since_hours is None else min(since_hours, count * s.window_hours)) * 3600
    ours = RunMatch(target.run_dir)
    rows = [r for r in labelled(Path(db), since=cutoff) if ours(r.run_dir)]
    buckets: dict[int, list[LabelledRequest]] = {}
    for r in rows:  # a clock that moved backwards puts a row "in the future": the latest window takes it
        buckets.setdefault(max(0, int((now - r.ts) // (s.window_hours * 3600))), []).append(r)
    windows = [_window(buckets.get(i, []), target, max(cutoff, now - (i + 1) * s.window_hours * 3600),
                       now - i * s.window_hours * 3600) for i in range(count) if i == 0 or i in buckets]
    return LiveQuality(target.metric, "Wilson" if target.metric in BINARY else "bootstrap", target.accepted,
                       s.max_quality_drop, s.min_labelled, s.window_hours, windows)


def _window(rows: list[LabelledRequest], target: QualityTarget, start: float, end: float) -> QualityWindow:
    truths, answers, unscored = scored(sorted(rows, key=lambda r: r.ts), target.metric)
    if not truths:
        return QualityWindow(start, end, 0, unscored, None, None, None, False, False)
    cap = max(MAX_SCORED, target.settings.min_labelled)  # the newest `cap`: bounded work (module docstring)
    left_out = max(0, len(truths) - cap)
    truths, answers = truths[left_out:], answers[left_out:]
    value, low, high = figure(truths, answers, target.metric)
    verdict = len(truths) >= target.settings.min_labelled
    drop = verdict and target.accepted is not None and high < target.accepted - target.settings.max_quality_drop
    return QualityWindow(start, end, len(truths), unscored, value, low, high, verdict, bool(drop), left_out)


class QualityWatch(CountedUpdate):
    """The server's live-quality gauges for the latest window, recomputed in the background every
    `monitor.update_every` verdicts (`seen(n)`, called by the feedback route), and when a scrape of
    `metrics` finds them older than `refresh_s` seconds (`clock()` time; see `refresh`; None: never)."""

    name = "quality"
    failures_series = "tunesmith_quality_update_failures_total"

    def __init__(self, target: QualityTarget, db: Path, metrics, refresh_s: float | None = REFRESH_S,
                 clock=time.monotonic):
        super().__init__(target.settings.update_every, metrics.quality_failures.inc, clock)
        self.target, self.db, self.metrics, self.refresh_s = target, Path(db), metrics, refresh_s
        self.last: LiveQuality | None = None
        self._refreshing = refresh_s is not None
        metrics.before_scrape.append(self.refresh)
        if target.accepted is not None:
            metrics.accepted_quality.labels(target.metric).set(target.accepted)

    def refresh(self) -> bool:
        """Start an update when the newest one began `refresh_s` or more ago (or none ever did), so
        that imported verdicts and the window's passing time reach the gauges; True when one started.
        Called on each scrape: cheap, never waits, one update at a time, nothing after `close()`."""
        started = self.last_started
        if not self._refreshing or (started is not None and self.clock() - started < self.refresh_s):
            return False
        return self.start()

    def close(self, timeout: float = 30) -> None:
        """No more refreshes on scrape; a running update finishes (verdicts `seen` later still count)."""
        self._refreshing = False
        super().close(timeout)

    def follow(self, run_dir: Path) -> bool:
        """Measure another run from now on (a hot swap to it): its metric, accepted figure and
        settings; the gauges are recomputed in the background. False (nothing changes) when that run
        has no live quality."""
        target = quality_target(run_dir)
        if target is None:
            return False
        old, self.target, self.every = self.target, target, target.settings.update_every
        m = self.metrics
        if old.metric != target.metric:  # the old metric's series would otherwise linger, frozen
            for gauge in (m.live_quality, m.live_quality_low, m.live_quality_high, m.live_quality_labelled,
                          m.accepted_quality):
                _remove(gauge, old.metric)
        if target.accepted is not None:
            m.accepted_quality.labels(target.metric).set(target.accepted)
        else:
            _remove(m.accepted_quality, target.metric)
        self.start()
        return True

    def update_now(self, now: float | None = None) -> LiveQuality:
        target = self.target
        live = live_quality(self.db, target, now, since_hours=target.settings.window_hours)
        if self.target is not target:  # swapped meanwhile: its series are gone, the rerun sets the new run's
            return live
        w, m, name = live.latest, self.metrics, target.metric
        for gauge, value in ((m.live_quality, w.value), (m.live_quality_low, w.ci_low),
                             (m.live_quality_high, w.ci_high)):
            gauge.labels(name).set(float("nan") if value is None else value)  # NaN: no figure, no alert
        m.live_quality_labelled.labels(name).set(w.n)
        self.last = live
        return live


def _remove(gauge, metric: str) -> None:
    try:
        gauge.remove(metric)
    except KeyError:  # never set
        pass


def with_live_quality(report: dict, run_dir: Path, db: Path, since_hours: float | None = None,
                      now: float | None = None) -> dict:
    """`report` (tunesmith monitor's drift report) with `quality` (LiveQuality.to_dict(), None for a
    run without one) added; a quality drop makes the recommendation "retrain", saying why."""
    target = quality_target(run_dir)
    live = None if target is None else live_quality(db, target, now, since_hours)
    report["quality"] = None if live is None else live.to_dict()
    if live is not None and live.drop_alert:
        w, drift = live.latest, report.get("reason")
        report.update(recommendation="retrain", reason=(
            f"live {live.metric} {w.value:.4g} [{w.ci_low:.4g}, {w.ci_high:.4g}] on {w.n} labelled requests "
            f"in the last {live.window_hours:g} h: the upper end is below the accepted {live.accepted:.4g} "
            f"on test minus {live.max_drop:g}; run `tunesmith retrain {run_dir}`"
            + (f" (drift: {drift})" if report.get("drift") else "")))
    return report


def quality_lines(quality: dict | None) -> list[str]:
    """What `tunesmith monitor` prints about live quality (from `with_live_quality`'s `quality`)."""
    if quality is None:
        return ["live quality: not measured for this run (no answers to judge, or no config.yaml)"]
    if quality["verdicts"] == 0:
        return [f"live {quality['metric']}: {NO_FEEDBACK}"]
    hours, end = quality["window_hours"], quality["windows"][0]["end"]
    lines = []
    for i, w in enumerate(quality["windows"]):
        ago = (round((end - w["end"]) / 3600, 1), round((end - w["start"]) / 3600, 1))
        when = f"last {min(hours, ago[1]):g} h" if i == 0 else f"{ago[0]:g}-{ago[1]:g} h ago"
        lines.append(f"live {quality['metric']} ({when}): {_window_text(w, quality)}" if i == 0
                     else f"  {when}: {_window_text(w, quality)}")
    return lines


def _window_text(w: dict, q: dict) -> str:
    accepted = ("no accepted figure (no summary.json)" if q["accepted"] is None
                else f"accepted {q['accepted']:.4g} on test")
    unscored = (f"; {w['unscored']} rating-only verdicts not scored ({q['metric']} needs a label or correction)"
                if w["unscored"] else "")
    if w["n"] == 0:
        return f"no labelled requests{unscored}"
    newest = f"the newest {w['n']} of {w['n'] + w['left_out']}" if w.get("left_out") else str(w["n"])
    text = (f"{w['value']:.4g} [{w['ci_low']:.4g}, {w['ci_high']:.4g}] on {newest} labelled requests "
            f"({q['interval']} 95%); {accepted}")
    if not w["verdict"]:
        return f"{text}; too few for a verdict (need {q['min_labelled']}){unscored}"
    if q["accepted"] is None:
        return text + unscored
    sign = "<" if w["drop_alert"] else ">="
    word = "QUALITY DROP" if w["drop_alert"] else "ok"
    return f"{text}; {word} (upper end {w['ci_high']:.4g} {sign} {q['accepted']:.4g} - {q['max_drop']:g}){unscored}"
