"""report.html says how many test rows the data stage removed (as the CLI line and summary.json do); the
end-to-end check is tests/test_clean_targets.py's CLI test."""

from __future__ import annotations

from tunesmith.report.data_section import data_section

SPLITS = {"train": {"rows": 3}, "test": {"rows": 2}}


def test_the_data_section_says_none_were_removed_and_takes_the_summary_figure():
    assert "test rows removed: 0" in data_section({"splits": SPLITS}, {"test_rows_removed": 0})
    summary = {"test_rows_removed": 2, "test_rows_removed_by_reason": {"empty_target": 2}}
    assert "test rows removed: 2 (empty_target 2;" in data_section({"splits": SPLITS}, summary)
    assert "test rows removed" not in data_section({"splits": SPLITS})  # a data report without curation
