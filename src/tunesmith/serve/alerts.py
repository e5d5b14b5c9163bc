"""Monitoring configuration generated for a run: Prometheus alert rules (and their promtool unit
tests), a Grafana dashboard and an example prometheus.yml.

    tunesmith monitor RUN_DIR --alerts DIR
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from tunesmith import fsio
from tunesmith.errors import InputError


def alert_rules(latency_p95_ms: float, error_rate: float = 0.05, no_traffic_minutes: int = 15,
                max_quality_drop: float = 0.05, min_labelled: int = 30) -> dict:
    """Rule groups: error rate, p95 latency over the objective's constraint, drift, no traffic, and a
    live-quality drop (monitor.max_quality_drop and monitor.min_labelled baked into the rule)."""
    seconds = latency_p95_ms / 1000
    return {"groups": [{"name": "tunesmith", "rules": [
        {"alert": "TunesmithHighErrorRate",
         "expr": f'sum(rate(tunesmith_requests_total{{status=~"5.."}}[5m])) '
                 f'/ clamp_min(sum(rate(tunesmith_requests_total[5m])), 1e-9) > {error_rate}',
         "for": "5m", "labels": {"severity": "page"},
         "annotations": {"summary": f"more than {error_rate:.0%} of requests fail"}},
        {"alert": "TunesmithLatencyP95High",
         "expr": 'histogram_quantile(0.95, sum by (le) (rate(tunesmith_request_latency_seconds_bucket'
                 f'{{route=~"/v1/.*"}}[5m]))) > {seconds:g}',
         "for": "10m", "labels": {"severity": "warn"},
         "annotations": {"summary": f"p95 latency over the objective's {latency_p95_ms:g} ms"}},
        {"alert": "TunesmithDrift", "expr": "max by (signal) (tunesmith_drift_detected) > 0", "for": "30m",
         "labels": {"severity": "warn"},
         "annotations": {"summary": "live inputs drift from the training data ({{ $labels.signal }}); "
                                    "run `tunesmith monitor RUN_DIR`"}},
        {"alert": "TunesmithNoTraffic",
         "expr": f'sum(increase(tunesmith_requests_total{{route=~"/v1/.*"}}[{no_traffic_minutes}m])) == 0',
         "for": f"{no_traffic_minutes}m", "labels": {"severity": "info"},
         "annotations": {"summary": f"no inference requests for {no_traffic_minutes} minutes"}},
        quality_rule(max_quality_drop, min_labelled),
    ]}]}


def quality_rule(max_quality_drop: float, min_labelled: int) -> dict:
    """TunesmithQualityDrop: even the upper end of the live interval is below the accepted test figure
    minus the allowed drop, on a window with enough labelled requests for a verdict (an empty or
    thin window never pages)."""
    return {"alert": "TunesmithQualityDrop",
            "expr": f"tunesmith_live_quality_ci_high < (tunesmith_accepted_quality - {max_quality_drop:g}) "
                    f"and tunesmith_live_quality_labelled >= {min_labelled}",
            "for": "15m", "labels": {"severity": "page"},
            "annotations": {"summary": QUALITY_SUMMARY.format(drop=f"{max_quality_drop:g}",
                                                              value="{{ $value | printf \"%.3f\" }}")}}


QUALITY_SUMMARY = ("live {{{{ $labels.metric }}}} on feedback-labelled traffic fell: the upper end of its 95% "
                   "interval ({value}) is below the accepted test figure minus {drop}; run `tunesmith monitor "
                   "RUN_DIR`, then `tunesmith retrain RUN_DIR`")


def rule_tests(rules_file: str, max_quality_drop: float = 0.05, min_labelled: int = 30) -> dict:
    """promtool unit tests: each alert fires on a synthetic series built to trip it, and not before."""
    return {"rule_files": [rules_file], "evaluation_interval": "1m", "tests": [quality_test(max_quality_drop,
                                                                                           min_labelled),
        {"interval": "1m",
         "input_series": [
             {"series": 'tunesmith_requests_total{route="/v1/classify",status="200"}', "values": "0+10x40"},
             {"series": 'tunesmith_requests_total{route="/v1/classify",status="500"}', "values": "0+5x40"},
             {"series": 'tunesmith_drift_detected{signal="embedding"}', "values": "0x5 1x40"}],
         "alert_rule_test": [
             {"eval_time": "3m", "alertname": "TunesmithHighErrorRate", "exp_alerts": []},
             {"eval_time": "15m", "alertname": "TunesmithHighErrorRate",
              "exp_alerts": [{"exp_labels": {"severity": "page"},
                              "exp_annotations": {"summary": "more than 5% of requests fail"}}]},
             {"eval_time": "40m", "alertname": "TunesmithDrift",
              "exp_alerts": [{"exp_labels": {"severity": "warn", "signal": "embedding"},
                              "exp_annotations": {"summary": "live inputs drift from the training data (embedding); "
                                                             "run `tunesmith monitor RUN_DIR`"}}]},
             {"eval_time": "20m", "alertname": "TunesmithNoTraffic", "exp_alerts": []}]},
        {"interval": "1m",
         "input_series": [{"series": 'tunesmith_requests_total{route="/v1/classify",status="200"}',
                           "values": "5x60"}],
         "alert_rule_test": [{"eval_time": "40m", "alertname": "TunesmithNoTraffic",
                              "exp_alerts": [{"exp_labels": {"severity": "info"},
                                              "exp_annotations": {"summary": "no inference requests "
                                                                             "for 15 minutes"}}]}]},
    ]}


def quality_test(max_quality_drop: float, min_labelled: int, accepted: float = 0.9) -> dict:
    """TunesmithQualityDrop fires for an upper end 0.01 under accepted - drop (after its `for`), and
    not for one 0.01 over it, nor on a window one labelled request short of a verdict."""
    below, above = round(accepted - max_quality_drop - 0.01, 6), round(accepted - max_quality_drop + 0.01, 6)
    cases = {"accuracy": (below, min_labelled), "exact_match": (above, min_labelled),
             "rouge_l": (below, min_labelled - 1)}
    series = [{"series": f'{name}{{metric="{metric}"}}', "values": f"{value:g}x40"}
              for metric, (high, n) in cases.items()
              for name, value in (("tunesmith_accepted_quality", accepted), ("tunesmith_live_quality_ci_high", high),
                                  ("tunesmith_live_quality_labelled", n))]
    summary = QUALITY_SUMMARY.format(drop=f"{max_quality_drop:g}", value=f"{below:.3f}").replace(
        "{{ $labels.metric }}", "accuracy")
    return {"interval": "1m", "input_series": series, "alert_rule_test": [
        {"eval_time": "10m", "alertname": "TunesmithQualityDrop", "exp_alerts": []},  # pending: `for` 15m
        {"eval_time": "20m", "alertname": "TunesmithQualityDrop",
         "exp_alerts": [{"exp_labels": {"severity": "page", "metric": "accuracy"},
                         "exp_annotations": {"summary": summary}}]}]}


def dashboard(title: str) -> dict:
    """A Grafana dashboard over tunesmith's series (Prometheus data source named by a variable)."""
    panels = [("Requests per second by status", 'sum by (status) (rate(tunesmith_requests_total[1m]))'),
              ("p50 / p95 latency (s)",
               'histogram_quantile(0.95, sum by (le) (rate(tunesmith_request_latency_seconds_bucket[5m])))'),
              ("Batch size (mean)",
               'sum(rate(tunesmith_batch_size_sum[5m])) / sum(rate(tunesmith_batch_size_count[5m]))'),
              ("In-flight requests", "tunesmith_in_flight_requests"),
              ("Predicted labels", 'sum by (label) (rate(tunesmith_predicted_label_total[5m]))'),
              ("Drift score by signal", "tunesmith_drift_score"),
              ("Live quality (95% interval) vs accepted on test",
               ("tunesmith_live_quality", "tunesmith_live_quality_ci_low", "tunesmith_live_quality_ci_high",
                "tunesmith_accepted_quality")),
              ("Feedback-labelled requests (latest window)", "tunesmith_live_quality_labelled"),
              ("Tokens in / out per second", 'rate(tunesmith_tokens_in_total[1m])'),
              ("Resident memory (bytes)", "process_resident_memory_bytes")]
    return {"title": title, "uid": None, "schemaVersion": 39, "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
            "panels": [{"id": i + 1, "type": "timeseries", "title": name,
                        "datasource": {"type": "prometheus", "uid": "${datasource}"},
                        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                        "targets": _targets(expr)} for i, (name, expr) in enumerate(panels)]}


def _targets(exprs: str | tuple[str, ...]) -> list[dict]:
    """One query per expression; several share a panel, each named in the legend by its series and label."""
    if isinstance(exprs, str):
        return [{"expr": exprs, "refId": "A"}]
    return [{"expr": e, "refId": chr(ord("A") + i), "legendFormat": e.removeprefix("tunesmith_") + " {{metric}}"}
            for i, e in enumerate(exprs)]


def prometheus_config(target: str, rules_file: str = "alerts.yml", scrape_interval: str = "15s") -> dict:
    """An example prometheus.yml scraping one tunesmith server (add `authorization` when keys are set)."""
    return {"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [rules_file],
            "scrape_configs": [{"job_name": "tunesmith", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}]}


MARKER = ".tunesmith-alerts"  # an earlier --alerts output, which a later one may replace
FILES = ("alerts.yml", "alerts_test.yml", "grafana-dashboard.json", "prometheus.yml")  # what it writes


def check_out(out_dir: Path) -> None:
    """Refuse an --alerts folder whose files are not ours to replace: a file, a folder that cannot be
    made, a non-empty folder that is not an earlier --alerts output (a prometheus.yml of the user's
    own is never overwritten), or an earlier output whose files were edited since (the marker keeps
    the digest of each file written). A new or empty folder is fine; other files beside ours stay as they are.

    Raises:
        InputError: naming --alerts; nothing has been touched.
    """
    fsio.check_output_folder(Path(out_dir), f"--alerts {out_dir}", lambda folder: (folder / MARKER).is_file(),
                             "--alerts")
    written = _written(Path(out_dir) / MARKER)
    for name, digest in written.items():
        path = Path(out_dir) / name
        if path.is_symlink() or (path.exists() and (not path.is_file() or _digest(path) != digest)):
            raise InputError(f"{name} was changed since `tunesmith monitor --alerts` wrote it; left untouched",
                             f"--alerts {out_dir}", "move your version away, or give a new folder")


def _written(marker: Path) -> dict[str, str]:
    """{file name: sha256} the marker records (none in a marker of an older version, or no marker)."""
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    return {k: str(v) for k, v in recorded.items() if k in FILES}  # only our names: never `../x` of an edit


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_monitoring(out_dir: Path, name: str, latency_p95_ms: float, target: str = "127.0.0.1:8000",
                     max_quality_drop: float = 0.05, min_labelled: int = 30) -> list[Path]:
    """Write alerts.yml, alerts_test.yml, grafana-dashboard.json and prometheus.yml into `out_dir`
    (the quality-drop rule with the run's monitor.max_quality_drop and monitor.min_labelled), a new or
    empty folder or an earlier output (see check_out)."""
    out_dir = Path(out_dir)
    check_out(out_dir)
    quality = {"max_quality_drop": max_quality_drop, "min_labelled": min_labelled}
    files = {"alerts.yml": yaml.safe_dump(alert_rules(latency_p95_ms, **quality), sort_keys=False),
             "alerts_test.yml": yaml.safe_dump(rule_tests("alerts.yml", **quality), sort_keys=False),
             "grafana-dashboard.json": json.dumps(dashboard(f"tunesmith: {name}"), indent=2),
             "prometheus.yml": yaml.safe_dump(prometheus_config(target), sort_keys=False)}
    assert tuple(files) == FILES
    # The marker first (a kill leaves a folder a later run may write again), then each file, then the
    # marker again with the digests that tell an edited file from ours.
    marker = {"written_by": "tunesmith monitor --alerts; a later run may replace these files", "files": {}}
    fsio.write_text(out_dir / MARKER, json.dumps(marker) + "\n")
    for file, text in files.items():
        fsio.write_text(out_dir / file, text)
    marker["files"] = {file: _digest(out_dir / file) for file in files}
    fsio.write_text(out_dir / MARKER, json.dumps(marker, indent=1) + "\n")
    return [out_dir / f for f in files]
