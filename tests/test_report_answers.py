"""The report's answers tables (report/answers_section.py): the first N prompts side by side, the
examples where the models differ most, and every user text escaped."""

from __future__ import annotations

import json

from tunesmith.report.answers_section import answers_section, per_example_gaps

HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)>"


def _write(run_dir, rows):
    (run_dir / "predictions").mkdir(parents=True)
    (run_dir / "predictions" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")


def _row(i, gold, base, tuned, text=None):
    return {"text": text or f"question {i}", "gold": gold, "prediction": tuned, "baseline_prediction": base,
            "source": "test"}


def test_user_text_is_escaped_everywhere(tmp_path):
    _write(tmp_path, [_row(0, HOSTILE, HOSTILE + " b", HOSTILE, text=HOSTILE + " & more")])
    page = answers_section(tmp_path, "exact_match", 10)
    assert "<script>" not in page and "<img" not in page and "onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;" in page and "&amp; more" in page


def test_first_n_side_by_side_and_largest_differences_first(tmp_path):
    rows = [_row(i, "the cat sat", "the cat sat", "the cat sat") for i in range(12)]
    rows[3] = _row(3, "the cat sat", "dog", "the cat sat")          # tuned right, baseline wrong: +1
    rows[7] = _row(7, "the cat sat", "the cat sat", "the dog ran")  # tuned worse: -1
    rows[9] = _row(9, "the cat sat", "the cat", "the cat sat")      # a smaller gain in token F1
    _write(tmp_path, rows)
    page = answers_section(tmp_path, "token_f1", 5)
    first, most = page.split("differ most")
    assert first.count("<tr>") == 6 and "question 4" in first and "question 5" not in first  # header + 5 rows
    order = [most.index(f"question {i}") for i in (3, 7, 9)]
    assert order[0] < order[2] and order[1] < order[2] and "question 0" not in most  # ties (0) left out
    gaps = dict((r["text"], g) for g, r in per_example_gaps(rows, "token_f1"))
    assert gaps["question 3"] == 1.0 and gaps["question 7"] < 0 and 0 < gaps["question 9"] < 1


def test_no_predictions_or_zero_rows_gives_no_section(tmp_path):
    assert answers_section(tmp_path, "accuracy", 10) == ""
    _write(tmp_path, [_row(0, "a", "a", "b")])
    assert answers_section(tmp_path, "accuracy", 0) == ""
    assert "differ most" in answers_section(tmp_path, "accuracy", 10)
