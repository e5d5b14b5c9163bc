"""Human evaluation round trip: blinded A/B pairs out, ratings in, win rates and agreement back.

`export_pairs` writes pairs.csv and form.html (a self-contained page that saves a ratings CSV) with
the two systems' answers shuffled into sides A and B per pair, and key.json, which says which side is
which and is not shown to raters. `import_ratings` reads one ratings CSV per rater (columns id,
rater, choice with choice in A, B, tie), unblinds them with the key and reports, per rater and
pooled, how often system 1 (the fine-tuned model) wins, ties and loses with Wilson 95% intervals,
plus inter-rater agreement: Cohen's kappa for two raters, Fleiss' kappa for more.

Every cell that a spreadsheet would read as a formula (it starts with = + - @, a tab or a carriage
return: OWASP's CSV-injection list) is written with a leading single quote; the import strips it again.
"""

from __future__ import annotations

import codecs
import csv
import html
import io
import json
import math
import random
import secrets
from collections import Counter
from pathlib import Path

from tunesmith import fsio
from tunesmith.config.schema import control_problem
from tunesmith.data.io import json_value_error, loads_unique
from tunesmith.errors import DataError, InputError, RunDirError
from tunesmith.evaluate.predictions_file import example_key, require_test_predictions
from tunesmith.runs import enclosing_run

CHOICES = ("A", "B", "tie")
# A spreadsheet starts a formula at these; "'" is included so that escaping can be undone exactly.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
OUTCOMES = ("win", "tie", "loss")  # from system 1's side


def load_answers(run_dir: Path, against: Path | None) -> tuple[list[dict], str, str]:
    """(rows with id/prompt/one/two, name of system one, name of system two) from predictions files."""
    rows = _predictions(run_dir)
    if not rows:
        raise RunDirError("the run's predictions/test.jsonl holds no test examples: nothing to rate",
                          str(Path(run_dir) / "predictions" / "test.jsonl"), "evaluate the run again")
    if against is not None and Path(against).resolve() == Path(run_dir).resolve():
        raise InputError("is the run itself: every pair would show one answer twice", "--against",
                         "give another run, or leave --against out to rate the run against its base model")
    if against is None:
        pairs = [{"id": r["source"], "prompt": r["text"], "one": r["prediction"], "two": r["baseline_prediction"]}
                 for r in rows]
        return pairs, f"fine-tuned ({Path(run_dir).name})", "baseline"
    # The same test example: the same prompt and gold answer (two projects' test.jsonl:3 are different ones).
    other = {example_key(r): r for r in _predictions(against)}
    pairs = [{"id": r["source"], "prompt": r["text"], "one": r["prediction"],
              "two": other[key]["prediction"]} for r in rows if (key := example_key(r)) in other]
    if not pairs:
        raise RunDirError("the two runs share no test examples (the same prompt and gold answer)", str(against),
                          "compare runs of the same project")
    one, two = Path(run_dir).resolve(), Path(against).resolve()
    if one.name == two.name:  # two folders called `run`: the key must still say which is which
        return pairs, str(one), str(two)
    return pairs, one.name, two.name


def _predictions(run_dir: Path) -> list[dict]:
    rows = require_test_predictions(Path(run_dir))
    if rows and "prediction" not in rows[0]:
        raise RunDirError("a text run (task.type text) makes no answers to rate: it is scored by perplexity",
                          str(run_dir), "rate the answers of a classification, generation or chat run")
    return rows


KEY_FILE = "key.json"  # which side is which: kept from raters (the workbench never serves it)
EXPORT_FILES = ("pairs.csv", "form.html", KEY_FILE)


def export_pairs(run_dir: Path, out: Path, against: Path | None = None, n: int | None = None,
                 seed: int | None = None, overwrite: bool = False) -> Path:
    """Write pairs.csv, form.html and key.json under `out`; returns `out`.

    Without `seed`, the order and sides come from a fresh random seed (recorded in key.json), so no
    one can rebuild the blinding from a known default.

    Raises:
        InputError: `out` already holds an export (or files of those names) and `overwrite` is not set;
            nothing is written.
    """
    if n is not None and n < 1:
        raise InputError(f"must be at least 1, got {n}", "--n", "leave --n out to export every pair")
    _check_export_folder(Path(out), overwrite)
    replacing = (Path(out) / "key.json").is_file()  # an earlier export: its results.json goes with its key
    pairs, one, two = load_answers(run_dir, against)
    seed = secrets.randbits(63) if seed is None else seed
    rng = random.Random(seed)
    rng.shuffle(pairs)
    pairs = pairs[:n] if n is not None else pairs
    key = {}
    blinded = []
    for k, p in enumerate(pairs, start=1):
        swap = rng.random() < 0.5
        pid = f"p{k:04d}"
        key[pid] = {"A": "two" if swap else "one", "source": p["id"]}
        a, b = (p["two"], p["one"]) if swap else (p["one"], p["two"])
        blinded.append({"id": pid, "prompt": p["prompt"], "response_a": a, "response_b": b})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["id", "prompt", "response_a", "response_b"], quoting=csv.QUOTE_ALL)
    writer.writeheader()
    writer.writerows({k: escape_cell(v) for k, v in row.items()} for row in blinded)
    fsio.write_text(out / "pairs.csv", buf.getvalue())
    fsio.write_text(out / "form.html", _form(blinded))
    fsio.write_json(out / "key.json", {"one": one, "two": two, "seed": seed, "pairs": key})
    if replacing:
        (out / "results.json").unlink(missing_ok=True)  # the old key's results: not this export's
    return out


def _check_export_folder(out: Path, overwrite: bool) -> None:
    """A new export reshuffles the pairs under the same ids (p0001, ...), so ratings already collected
    for an earlier pairs.csv would be unblinded with the wrong key, silently: never replace one unasked."""
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise InputError(fsio.not_a_folder(out), f"--out {out}", "give a folder for the export")
    run = enclosing_run(out)
    if run is not None and out.resolve() != run / "human":  # RUN/human is the default; model/ is not a place
        raise InputError(f"is inside the run directory {run}, where an export goes to {run / 'human'} only",
                         f"--out {out}", "leave --out out, or give a folder outside any run")
    why = None if out.exists() else fsio.uncreatable(out)
    if why:
        raise InputError(f"cannot be created: {why}", f"--out {out}", "give a folder path you can write to")
    if overwrite:
        if rated := sorted(p.name for p in out.glob("ratings-*.csv")) if out.is_dir() else []:
            # The workbench scores every ratings-*.csv here with the key: the new one would unblind them wrongly.
            raise InputError(f"the folder holds ratings collected for the current pairs ({', '.join(rated[:3])}"
                             f"{', ...' if len(rated) > 3 else ''}); a new export would score them with the wrong key",
                             f"--out {out}", f"import them first (tunesmith human import ... --key {out / 'key.json'}) "
                             "and move them out of the folder, or give another --out folder")
        return
    if (out / "key.json").exists():
        raise InputError("the folder already holds a human evaluation export (key.json); exporting again would "
                         "reshuffle the pairs, and ratings collected for the old pairs.csv would be scored against "
                         "the wrong key", f"--out {out}",
                         f"import those ratings with --key {out / 'key.json'}, give another --out folder, or pass "
                         "--overwrite to replace the export")
    present = [name for name in EXPORT_FILES if (out / name).exists()]
    if present:
        raise InputError(f"the folder already holds {', '.join(present)}, left untouched", f"--out {out}",
                         "give another --out folder, or pass --overwrite to replace them")


def escape_cell(value) -> str:
    """The cell as text that a spreadsheet shows literally: a leading ' before = + - @ tab CR (or ')."""
    value = str(value)
    return "'" + value if value.startswith(_FORMULA_START) else value


def unescape_cell(value: str) -> str:
    """Undo `escape_cell`; a value it did not escape comes back unchanged."""
    return value[1:] if value[:1] == "'" and value[1:2] and value[1] in _FORMULA_START else value


def _form(pairs: list[dict]) -> str:
    items = "".join(
        f"<fieldset data-id='{p['id']}'><legend>{p['id']}</legend><p class='q'>{html.escape(p['prompt'])}</p>"
        f"<div class='ab'><div><b>A</b><pre>{html.escape(p['response_a'])}</pre></div>"
        f"<div><b>B</b><pre>{html.escape(p['response_b'])}</pre></div></div>"
        + "".join(f"<label><input type='radio' name='{p['id']}' value='{c}'> {label}</label> "
                  for c, label in (("A", "A is better"), ("tie", "tie"), ("B", "B is better")))
        + "</fieldset>" for p in pairs)
    script = """
function save(){const rater=document.getElementById('rater').value.trim();
 if(!rater){alert('Enter your name first');return;}
 const esc=s=>{s=String(s);if(/^[=+\\-@\\t\\r']/.test(s))s="'"+s;return '"'+s.replace(/"/g,'""')+'"';};
 let rows=['id,rater,choice'];let missing=0;
 document.querySelectorAll('fieldset').forEach(f=>{const c=f.querySelector('input:checked');
  if(c){rows.push([f.dataset.id,esc(rater),c.value].join(','));}else{missing++;}});
 const blob=new Blob([rows.join('\\n')+'\\n'],{type:'text/csv'});
 const a=document.createElement('a');a.href=URL.createObjectURL(blob);
 a.download='ratings-'+rater.replace(/[^A-Za-z0-9_-]/g,'_')+'.csv';document.body.appendChild(a);a.click();a.remove();
 document.getElementById('status').textContent='saved '+(rows.length-1)+' ratings'
  +(missing?', '+missing+' unrated':'');}
"""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>tunesmith: rate the answers</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
            ".ab{display:grid;grid-template-columns:1fr 1fr;gap:1em}pre{white-space:pre-wrap;background:#f6f6f6;"
            "padding:.5em}fieldset{margin:1em 0}.q{font-weight:bold}</style></head><body>"
            "<h1>Which answer is better?</h1><p>For each prompt, choose the better answer, or tie. The two answers "
            "come from two systems in a random order. Then press <em>Save ratings</em> to download your file.</p>"
            "<p><label>Your name: <input id='rater'></label></p>"
            f"{items}<p><button onclick='save()'>Save ratings</button> <span id='status'></span></p>"
            f"<script>{script}</script></body></html>")


def read_ratings(path: Path) -> list[dict]:
    """Rows {id, rater, choice, line} of one ratings CSV; bad rows are errors naming file:line.

    Reads what spreadsheets save too: a UTF-8 byte-order mark, Windows-1252 or UTF-16 text, `;` or tab
    separators, escaped cells (see `escape_cell`), blank rows, and choices in any letter case.
    """
    text = _decode(Path(path), "ratings file")
    body = text.lstrip("\r\n")  # blank lines above the header; line numbers still count them
    lead = text[:len(text) - len(body)].count("\n") or text[:len(text) - len(body)].count("\r")
    # strict: a quote left open is an error at its row, not a cell that swallows the rest of the file
    reader = csv.DictReader(io.StringIO(body, newline=""), delimiter=_delimiter(body), strict=True)
    reader.fieldnames = [unescape_cell(c.strip()).lower() for c in reader.fieldnames or []]
    if twice := next((c for i, c in enumerate(reader.fieldnames) if c and c in reader.fieldnames[:i]), None):
        raise DataError(f"the column '{twice[:80]}' appears twice in the header (a row would keep its last cell)",
                        str(path), lead + 1, "give each column its own name")
    missing = {"id", "rater", "choice"} - set(reader.fieldnames)
    if missing:
        raise DataError(f"ratings file lacks column(s) {', '.join(sorted(missing))}", str(path), lead + 1,
                        "use the file the rating form saves (id,rater,choice)")
    rows, lines = [], io.StringIO(body, newline="").readlines()  # the lines as the csv reader counts them
    while True:
        # A row is named by the line it starts on (its first non-blank one; a quoted cell may span lines).
        start = reader.line_num
        while start < len(lines) and not lines[start].strip():
            start += 1
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as e:
            raise DataError(f"malformed CSV: {e}", str(path), lead + start + 1, "fix the row") from None
        if (cells := _rating_cells(row, str(path), lead + start + 1)) is not None:
            rows.append(cells)


def _rating_cells(row: dict, path: str, line: int) -> dict | None:
    """{id, rater, choice, line} of one CSV row; None for an empty row (a spreadsheet's trailing one)."""
    cells = {k: unescape_cell((row.get(k) or "").strip()) for k in ("id", "rater", "choice")}
    if not any(cells.values()):
        return None
    choice = {c.lower(): c for c in CHOICES}.get(cells["choice"].lower())
    if choice is None:
        raise DataError(f"choice {json.dumps(cells['choice'][:40])} is not one of A, B, tie", path, line, "fix the row")
    if not cells["rater"]:  # counted as a rater named "" it would skew agreement and the per-rater table
        raise DataError("the rater is empty", path, line, "put the rater's name in the row")
    if problem := control_problem(cells["rater"]):  # printed and reported: an escape code would act on a terminal
        raise DataError(f"the rater's name {problem}", path, line, "write the name in plain text")
    return {"id": cells["id"], "rater": cells["rater"], "choice": choice, "line": line}


def _decode(path: Path, what: str) -> str:
    """The file's text: UTF-8 (with or without BOM), UTF-16 with BOM, else Windows-1252 (what a
    spreadsheet on Windows saves as plain "CSV")."""
    if not path.is_file():
        found = ("is a folder, not a file" if path.is_dir() else "is not a regular file" if path.exists()
                 else "not found")
        raise DataError(f"{what} {found}", str(path), None, "check the path")
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            raise DataError(f"{what} is not valid UTF-16 text", str(path), None, "save it as CSV UTF-8") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        first_bad = e.start
    try:
        return raw.decode("cp1252")
    except UnicodeDecodeError:
        line = raw[:first_bad].count(b"\n") + 1
        raise DataError(f"{what} is neither UTF-8 nor Windows-1252 text (byte {first_bad})", str(path), line,
                        "save it as CSV UTF-8") from None


def _delimiter(text: str) -> str:
    """`,` unless the header row is clearly separated by `;` (spreadsheets in many locales) or tabs."""
    header = text.split("\n", 1)[0]
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    return max(counts, key=counts.get) if max(counts.values()) else ","


def read_key(key_path: Path) -> dict:
    """The key.json `human export` wrote; a missing or damaged one is an error naming it."""
    text = _decode(Path(key_path), "key file")
    try:
        key = loads_unique(text)  # a pair given twice would be read as its last entry
    except (json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"key file is not valid JSON ({getattr(e, 'msg', 'nested too deeply')})", str(key_path),
                        getattr(e, "lineno", None), "pass the key.json that `tunesmith human export` wrote") from None
    except ValueError as e:  # after JSONDecodeError (a subclass): an integer over Python's digit limit
        raise DataError(f"key file is not usable JSON ({json_value_error(e)})", str(key_path), None,
                        "pass the key.json that `tunesmith human export` wrote") from None
    if not isinstance(key, dict) or not {"one", "two", "pairs"} <= set(key) or not isinstance(key["pairs"], dict):
        raise DataError("key file lacks 'one', 'two' or 'pairs'", str(key_path), None,
                        "pass the key.json that `tunesmith human export` wrote")
    for side in ("one", "two"):  # printed by `human import`: never a control or escape code
        if not isinstance(key[side], str) or control_problem(key[side]):
            raise DataError(f"key file's '{side}' is not a system's name (a text without control characters)",
                            str(key_path), None, "pass the key.json that `tunesmith human export` wrote")
    bad = next((pid for pid, pair in key["pairs"].items()
                if not isinstance(pair, dict) or pair.get("A") not in ("one", "two")), None)
    if bad is not None:  # each pair says which system is shown as A: "one" or "two"
        raise DataError(f"key file's pair '{str(bad)[:80]}' does not say which system is A", str(key_path), None,
                        "pass the key.json that `tunesmith human export` wrote")
    return key


def import_ratings(key_path: Path, rating_files: list[Path]) -> dict:
    """Win/tie/loss of system one per rater and pooled, with Wilson intervals, and agreement."""
    key = read_key(key_path)
    for path in rating_files:  # every file is checked before any is used, so a typo fails fast
        if not Path(path).is_file():
            found = "is a folder, not a file" if Path(path).is_dir() else "not found"
            raise DataError(f"ratings file {found}", str(path), None, "pass the CSV files the rating form saved")
    by_rater: dict[str, dict[str, str]] = {}
    first: dict[tuple[str, str], tuple[str, str]] = {}  # (rater, pair) -> (choice, where it was rated)
    for path in rating_files:
        for row in read_ratings(path):
            if row["id"] not in key["pairs"]:
                raise DataError(f"pair '{row['id'][:80]}' is not in the key", str(path), row["line"],
                                "use the matching key.json")
            choice, seen = first.setdefault((row["rater"], row["id"]), (row["choice"], f"{path}:{row['line']}"))
            if choice != row["choice"]:  # a second download repeating a rating is fine; two verdicts are not
                raise DataError(f"rater '{row['rater'][:80]}' rated pair '{row['id'][:80]}' {choice} at {seen} and "
                                f"{row['choice']} here", str(path), row["line"], "keep one rating per rater and pair")
            by_rater.setdefault(row["rater"], {})[row["id"]] = _unblind(row["choice"], key["pairs"][row["id"]]["A"])
    if not by_rater:
        raise DataError("the ratings files hold no ratings", ", ".join(str(p) for p in rating_files), None,
                        "pass the files the rating form saved once pairs were rated")
    pooled = [o for ratings in by_rater.values() for o in ratings.values()]
    rated_pairs = len({pair for ratings in by_rater.values() for pair in ratings})
    result = {"one": key["one"], "two": key["two"], "raters": len(by_rater), "pairs": len(key["pairs"]),
              "pooled": outcome_rates(pooled, rated_pairs),
              "per_rater": {r: outcome_rates(list(v.values())) for r, v in sorted(by_rater.items())}}
    result["agreement"] = agreement(by_rater)
    return result


def _unblind(choice: str, side_a: str) -> str:
    if choice == "tie":
        return "tie"
    one_is_chosen = (choice == "A") == (side_a == "one")
    return "win" if one_is_chosen else "loss"


def outcome_rates(outcomes: list[str], pairs: int | None = None) -> dict:
    """Count, rate and Wilson 95% interval of each outcome. Pooled over raters (`pairs`: how many distinct
    pairs the ratings are of), the interval is that of `pairs` trials at the pooled rate: three raters
    rating the same ten pairs know about ten pairs, not thirty, and thirty trials gave a far too narrow
    interval (raters agreeing completely is the case it keeps; with disagreement it is conservative)."""
    n = len(outcomes)
    counts = Counter(outcomes)
    out = {"ratings": n}
    trials = min(n, pairs) if pairs else n
    for o in OUTCOMES:
        low, high = wilson(counts[o] * trials / n if n else 0, trials)
        out[o] = {"count": counts[o], "rate": round(counts[o] / n, 4) if n else 0.0, "ci_low": low, "ci_high": high}
    return out


def wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (k may be fractional: a rate times a number of trials)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


def agreement(by_rater: dict[str, dict[str, str]]) -> dict:
    """Cohen's kappa for two raters, Fleiss' kappa for three or more, on the pairs all of them rated."""
    raters = sorted(by_rater)
    if len(raters) < 2:
        return {"statistic": None, "note": "one rater: no agreement to measure"}
    shared = sorted(set.intersection(*(set(by_rater[r]) for r in raters)))
    if not shared:  # kappa of nothing is undefined; say so rather than write a NaN
        return {"statistic": None, "note": "no pair was rated by every rater: no agreement to measure", "pairs": 0}
    if len(raters) == 2:
        a = [by_rater[raters[0]][i] for i in shared]
        b = [by_rater[raters[1]][i] for i in shared]
        out = {"statistic": "cohen_kappa", "value": cohen_kappa(a, b), "pairs": len(shared)}
    else:
        table = [[sum(by_rater[r][i] == o for r in raters) for o in OUTCOMES] for i in shared]
        out = {"statistic": "fleiss_kappa", "value": fleiss_kappa(table), "pairs": len(shared)}
    if out["value"] is None:
        out["note"] = ("every rating of the shared pairs is the same outcome: agreement by chance is 1, and "
                       "kappa is undefined (scikit-learn and statsmodels give NaN)")
    return out


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Agreement of two raters beyond chance: (p_o - p_e) / (1 - p_e); None where it is undefined (no
    pairs, or p_e = 1: both raters gave one and the same outcome throughout)."""
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in set(ca) | set(cb)) / (n * n)
    return round((observed - expected) / (1 - expected), 6) if expected < 1 else None


def fleiss_kappa(table: list[list[int]]) -> float | None:
    """Fleiss' kappa from an (items x categories) table of rater counts (same raters per item); None
    where it is undefined (no items, or every rating in one category)."""
    n_items = len(table)
    if n_items == 0:
        return None
    m = sum(table[0])
    p_cat = [sum(row[j] for row in table) / (n_items * m) for j in range(len(table[0]))]
    p_item = [(sum(c * c for c in row) - m) / (m * (m - 1)) for row in table]
    p_bar, p_e = sum(p_item) / n_items, sum(p * p for p in p_cat)
    return round((p_bar - p_e) / (1 - p_e), 6) if p_e < 1 else None
