"""Preference data: `{prompt, chosen, rejected}` pairs (DPO, ORPO, SimPO) and `{prompt, completion, label}`
rows (KTO), read and validated with every bad row located (file:line), and the preference rows behind
a run's examples (which keep `rejected` / `desirable`, so saved splits hold them too).

Row parsing lives in data/pair_rows.py (re-exported here).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tunesmith.data.examples import Example, raise_for_problems
from tunesmith.data.io import RowProblem, read_rows
from tunesmith.data.pair_rows import Pair, PairError, has_text_cells, parse_pair
from tunesmith.errors import DataError

__all__ = ["Pair", "PairError", "load_pairs", "pair_example", "pairs_from_examples", "parse_pair"]


def pair_example(pair: Pair, answer: str) -> Example:
    """The pair's prompt with `answer` as an Example, so the task's prompt format encodes it as in training."""
    return Example(pair.prompt, answer, pair.source, messages=pair.messages)


def load_pairs(path: Path, kto: bool = False, max_errors: int = 20) -> list[Pair]:
    """Every row of a preference file; any bad row raises one DataError naming file:line (exit 2)."""
    result = read_rows(Path(path))
    pairs, problems = [], list(result.problems)
    for row in result.rows:
        try:
            pairs.append(parse_pair(row.record, f"{Path(row.file).name}:{row.line}", kto, has_text_cells(row.file)))
        except PairError as e:
            problems.append(RowProblem(row.file, row.line, str(e)))
    problems.sort(key=lambda p: p.line)
    want = "{prompt, completion, label}" if kto else "{prompt, chosen, rejected}"
    raise_for_problems(problems, max_errors, f"each row needs {want}; the prompt may be a 'messages' list")
    return pairs


def pairs_from_examples(examples: list[Example], kto: bool = False) -> list[Pair]:
    """The preference rows behind examples (their `rejected` / `desirable` fields). For KTO a pair becomes
    two rows, the chosen answer desirable and the rejected one not (TRL's unpairing of paired data).

    Raises:
        DataError: naming the first example that is not a preference row, the others (up to 20) as details.
    """
    pairs, bad = [], []
    for ex in examples:
        pair = Pair(ex.input, ex.target, ex.rejected, ex.desirable, ex.messages, ex.source)
        if kto and ex.desirable is not None:
            pairs.append(replace(pair, rejected=None))
        elif kto and ex.rejected is not None:
            pairs += [replace(pair, rejected=None, label=True), replace(pair, chosen=ex.rejected, rejected=None,
                                                                         label=False)]
        elif not kto and ex.rejected is not None:
            pairs.append(pair)
        else:
            bad.append(ex)
    if bad:
        _refuse_non_pairs(bad, kto)
    return pairs


def _refuse_non_pairs(bad: list[Example], kto: bool) -> None:
    first = bad[0]
    # A label that is not true/false leaves the row a generation row: say what a KTO label must be.
    want = ("{prompt, chosen, rejected} or {prompt, completion, label} (label true or false: a JSON boolean, "
            "or the text true/false in a CSV)") if kto else "{prompt, chosen, rejected}"
    why = " (a KTO row has no rejected answer)" if first.desirable is not None else ""
    more = f" (and {len(bad) - 1} more such rows)" if len(bad) > 1 else ""
    err = DataError(f"not a preference row{why}{more}", first.file or first.source, first.line or None,
                    f"train.method {'kto' if kto else 'dpo|orpo|simpo'} needs {want} rows")
    err.details = [f"{f'{ex.file}:{ex.line}' if ex.file else ex.source}: not a preference row" for ex in bad[:20]]
    raise err


def refuse_undesirable_targets(examples: list[Example], method: str) -> None:
    """Supervised methods learn every target: a KTO row labelled undesirable must not be one.

    Raises:
        DataError: naming the first such row.
    """
    bad = next((e for e in examples if e.desirable is False), None)
    if bad is not None:
        raise DataError(f"train.method {method} would learn a completion labelled undesirable (label: false)",
                        bad.file or bad.source, bad.line or None,
                        "use train.method kto for {prompt, completion, label} rows, or drop the undesirable ones")
