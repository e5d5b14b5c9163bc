"""The pieces every report page shares (report/html.py): page shell, number format, images, the log."""

from __future__ import annotations

from tunesmith.report.html import CSS, fmt, img, page, read_log


def test_page_escapes_the_title_and_carries_the_style_sheet():
    doc = page("a <b> & c", "<p>x</p>")
    assert doc.startswith("<!doctype html><html><head><meta charset='utf-8'>")
    assert "<title>a &lt;b&gt; &amp; c</title>" in doc and f"<style>{CSS}</style>" in doc
    assert doc.endswith("</head><body><p>x</p></body></html>")


def test_fmt_rounds_small_floats_separates_large_ones_and_escapes_text():
    assert fmt(0.123456) == "0.1235" and fmt(-99.99999) == "-100.0000"
    assert fmt(12345.678) == "12,345.7"
    assert fmt(None) == "n/a" and fmt(3) == "3" and fmt("<x>") == "&lt;x&gt;"


def test_img_inlines_a_png():
    assert img("QUJD", "plot") == "<p><img alt='plot' src='data:image/png;base64,QUJD'></p>"


def test_read_log_skips_blank_lines_and_a_missing_log(tmp_path):
    path = tmp_path / "train_log.jsonl"
    assert read_log(path) == []
    path.write_text('{"step": 1, "loss": 2.5}\n\n{"step": 2, "val_loss": 1.0}\n', encoding="utf-8")
    assert read_log(path) == [{"step": 1, "loss": 2.5}, {"step": 2, "val_loss": 1.0}]


def test_the_metric_bar_chart_holds_only_metrics_on_a_0_1_scale(monkeypatch):
    """Reward margins and perplexities (nats, or unbounded) would dwarf the 0-1 metrics on one axis."""
    from tunesmith.report import build, plots

    drawn = {}
    monkeypatch.setattr(plots, "metric_bars", lambda base, tuned, names, **kw: drawn.setdefault("names", names) and "")
    figures = {"preference_accuracy": 0.6, "reward_margin": 0.7, "exact_match": 0.3, "perplexity": 12.5,
               "latency_p95_ms": 80.0}
    build._plots({"baseline": figures, "finetuned": figures}, [], {"objective_metric": "exact_match"})
    assert drawn["names"] == ["preference_accuracy", "exact_match"]
