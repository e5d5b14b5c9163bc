"""Unit tests of each curation step: normalisation, PII, MinHash, deduplication, decontamination,
label noise, splits and augmentation."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tunesmith.config import AugmentConfig, CleanConfig, NormalizeSettings
from tunesmith.data import minhash
from tunesmith.data.augment import augment, char_noise, eda, oversample
from tunesmith.data.clean import Curation
from tunesmith.data.decontaminate import contaminated
from tunesmith.data.dedup import (
    assign_duplicates,
    exact_duplicates,
    near_duplicates,
    semantic_duplicates,
    shingle_jaccard,
)
from tunesmith.data.examples import Example
from tunesmith.data.normalize import dedup_text, normalize_text
from tunesmith.data.pii import find_pii, iban_ok, luhn_ok, redact
from tunesmith.data.profile import length_histogram, lexical_diversity
from tunesmith.data.split import group_split


def test_normalize_reports_each_kind_of_change():
    text, changes = normalize_text("<p>Caf\u0065\u0301 &amp; bar</p>\x07  \u200bok\t\tthere  ", NormalizeSettings())
    assert text == "Café & bar ok there"
    assert changes == ["unicode", "control_chars", "html", "whitespace"]
    assert normalize_text("plain text", NormalizeSettings()) == ("plain text", [])
    # every bidi control goes (isolates and U+061C too); ZWNJ and ZWJ are parts of words and emoji
    joined = "\u0645\u06cc\u200c\u0631\u0648\u062f \U0001f468\u200d\U0001f469"  # a Persian word, an emoji
    isolated = normalize_text(f"\u2066red\u2069 \u061cx\u202e {joined}", NormalizeSettings())[0]
    assert isolated == f"red x {joined}"
    # a soft hyphen is an invisible break hint; tag characters spell the flags of England, Scotland and Wales
    england = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
    assert normalize_text(f"co\u00adoperate {england}", NormalizeSettings())[0] == f"cooperate {england}"
    assert normalize_text("a < b and c > d", NormalizeSettings())[0] == "a < b and c > d"  # not a tag


def test_dedup_text_folds_case_punctuation_and_spacing():
    assert dedup_text("  Where is MY card?! ") == dedup_text("where is my card") == "where is my card"


@pytest.mark.parametrize("text,kinds", [
    ("write to anna.b@example.org today", ["email"]),
    ("card 4111 1111 1111 1111 please", ["card"]),
    ("card 4111 1111 1111 1112 please", []),                  # fails the Luhn check
    ("IBAN GB82 WEST 1234 5698 7654 32", ["iban"]),
    ("IBAN GB83 WEST 1234 5698 7654 32", ["phone"]),          # fails mod 97 (its digit run reads as a phone)
    ("from 192.168.0.12 and 2001:0db8:0000:0000:0000:ff00:0042:8329", ["ip", "ip"]),
    ("version 999.1.2.3 is not an address", []),
    ("ipv6 2001:db8::1, fe80::1%eth0 and ::ffff:10.0.0.1 (::1)", ["ip", "ip", "ip", "ip"]),  # compressed forms
    ("std::vector<int> a::b, x :: Int at 10:30:00 on 00:1a:2b:3c:4d:5e", []),  # code, times, a MAC address
    ("xs[::2] ys[1::2] John 3:16", []),  # Python slices are not addresses
    ("IPv6:2001:0db8:85a3:0000:0000:8a2e:0370:7334 addr:2001:db8::1 at 12:30:10.0.0.1", ["ip", "ip", "ip"]),
    ("1:2:3:4:5:6:7:: and ::1:2:3:4:5:6:7 at http://[::1]:8080", ["ip", "ip", "ip"]),
    ("call +44 20 7946 0958 or 555-123-4567", ["phone", "phone"]),
    ("paid 300 on 2024-01-15 for order 12", []),
])
def test_pii_kinds_and_checksums(text, kinds):
    assert [f.kind for f in find_pii(text)] == kinds


def test_an_ipv6_zone_keeps_the_sentences_full_stop():
    text = "reach fe80::1%eth0. Then stop"
    assert redact(text, find_pii(text)) == "reach [IP]. Then stop"


def test_person_names_found_by_census_lists_titles_and_introductions():
    """Recall on names in customer-style sentences; nothing found in 13,083 real banking queries."""
    import csv
    from pathlib import Path

    people = ["Amy Jones", "Carlos Garcia", "Linda Nguyen", "Robert Miller", "Keisha Washington", "Tom Baker",
              "Sarah Kim", "David Cohen", "Maria Lopez", "James Patel"]
    shapes = ["My name is {}, my card is blocked", "Please transfer 20 to {} today", "Hi, this is {} again",
              "I sent money to {} but it never arrived"]
    texts = [shape.format(p) for shape in shapes for p in people]
    found = [redact(t, find_pii(t, ["person"])) for t in texts]
    assert sum("[PERSON]" in f and not any(p in f for p in people) for f in found) >= 0.9 * len(texts)
    assert redact("Dr. Okafor and Ms Nakamura-Li", find_pii("Dr. Okafor and Ms Nakamura-Li", ["person"])) == \
        "Dr. [PERSON] and Ms [PERSON]"
    for negative in ("Will you help me with Apple Pay?", "I am Canadian", "this is Visa card", "My Bank is in Europe"):
        assert find_pii(negative, ["person"]) == []
    assert find_pii("My name is Amy Jones") == []  # person is opt-in: not among the default kinds
    data = Path(__file__).parent / "data" / "banking77"
    queries = [r["text"] for f in ("train.csv", "test.csv") for r in csv.DictReader(open(data / f, encoding="utf-8"))]
    assert len(queries) > 10_000 and sum(bool(find_pii(q, ["person"])) for q in queries) == 0


def test_redact_replaces_each_finding_with_its_kind():
    text = "mail a@b.co, card 4111-1111-1111-1111"
    assert redact(text, find_pii(text)) == "mail [EMAIL], card [CARD]"
    assert luhn_ok("79927398713") is False and luhn_ok("4111111111111111")
    assert iban_ok("DE89370400440532013000")


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    words = [" ".join(rng.choice("abcdefghij") * rng.randint(1, 4) for _ in range(30)) for _ in range(20)]
    sigs = minhash.signatures(words, num_perm=256, ngram=3)
    for i in range(0, 20, 2):
        a, b = words[i], words[i + 1]
        sa, sb = {a[k:k + 3] for k in range(len(a) - 2)}, {b[k:k + 3] for k in range(len(b) - 2)}
        true = len(sa & sb) / len(sa | sb)
        estimate = float((sigs[i] == sigs[i + 1]).mean())
        assert abs(estimate - true) < 0.12


def test_minhash_is_deterministic_and_chunking_does_not_change_it():
    texts = [f"text number {i} about cards" for i in range(50)]
    whole = minhash.signatures(texts, ngram=4)
    assert np.array_equal(whole, minhash.signatures(texts, ngram=4, chunk_shingles=30))
    assert minhash.signatures(["ab"], ngram=5).shape == (1, 128)   # shorter than one shingle



def test_minhash_of_a_text_longer_than_a_chunk_is_the_minimum_over_its_segments():
    """A long row is hashed in overlapping pieces (bounded memory) and keeps its exact signature."""
    rng = np.random.default_rng(0)
    long = "".join(rng.choice(list("abcdé日本 "), size=997))          # multi-byte characters cut mid-way
    texts = ["short one", long, "x", long[:400], ""]
    whole = minhash.signatures(texts, ngram=5)
    for chunk in (10, 31, 64, 500):
        assert np.array_equal(whole, minhash.signatures(texts, ngram=5, chunk_shingles=chunk))
    # The reference: the minimum over every shingle of the whole text, computed one text at a time.
    a, b = minhash.hash_params(128, 1)
    one = minhash.signatures([long], ngram=5)[0]
    enc = long.encode()
    x = [int.from_bytes(enc[i:i + 5], "big") for i in range(len(enc) - 4)]
    ref = [min(((int(ai) * v + int(bi)) % 2**64) >> 32 for v in x) for ai, bi in zip(a, b)]
    assert one.tolist() == ref

def test_lsh_bands_put_the_step_near_the_threshold():
    for threshold in (0.5, 0.7, 0.9):
        bands = minhash.lsh_bands(threshold, 128)
        assert bands.bands * bands.rows <= 128
        step = (1 / bands.bands) ** (1 / bands.rows)  # where the S-curve rises fastest
        assert abs(step - threshold) < 0.12


def test_exact_and_near_duplicates_keep_the_first_row():
    texts = ["Where is my card?", "where is my card", "My card has not arrived yet, where is it?",
             "My card has not arived yet, where is it?", "How do I change my PIN?"]
    assert [(d.index, d.of) for d in exact_duplicates(texts)] == [(1, 0)]
    near = near_duplicates(texts, threshold=0.7, ngram=3, skip={1})
    assert [(d.index, d.of, d.kind) for d in near] == [(3, 2, "near_duplicate")]
    assert near[0].similarity >= 0.7


def test_near_duplicates_do_not_chain_and_report_the_pair_similarity():
    # A ~ B and B ~ C reach the threshold, A ~ C does not: B goes (a duplicate of A), C stays,
    # because its only similar row was removed and nothing kept is within the threshold of it.
    a, b, c = "Where is my new card", "Where is my new card I ordered", "Where is my new card I ordered last week"
    fold = [dedup_text(t) for t in (a, b, c)]
    assert shingle_jaccard(fold[0], fold[1], 3) >= 0.6 and shingle_jaccard(fold[1], fold[2], 3) >= 0.6
    assert shingle_jaccard(fold[0], fold[2], 3) < 0.6
    found = near_duplicates([a, b, c], threshold=0.6, ngram=3)
    assert [(d.index, d.of) for d in found] == [(1, 0)]
    # The similarity is the exact Jaccard of that pair's shingles, not a MinHash estimate.
    assert found[0].similarity == round(shingle_jaccard(fold[0], fold[1], 3), 4) == 0.6667


def test_duplicates_attach_to_the_most_similar_kept_row():
    links = [(0, 2, 0.8), (1, 2, 0.9), (0, 1, 0.75), (2, 3, 0.95)]
    # 1 is a duplicate of 0; 2 is linked to 0 (kept) and 1 (removed): it goes as a duplicate of 0;
    # 3 is linked only to 2, which was removed, so it stays.
    assert [(d.index, d.of, d.similarity) for d in assign_duplicates(links, "near_duplicate")] == \
        [(1, 0, 0.75), (2, 0, 0.8)]


def test_shingle_jaccard_counts_byte_ngrams():
    assert shingle_jaccard("abcd", "abcd", 3) == 1.0
    assert shingle_jaccard("abcd", "abce", 3) == 1 / 3          # {abc, bcd} vs {abc, bce}
    assert shingle_jaccard("ab", "ab", 3) == 1.0                # shorter than n: one padded shingle


def test_semantic_duplicates_cluster_on_cosine():
    v = np.array([[1, 0, 0], [0.999, 0.04, 0], [0, 1, 0], [0, 0.99, 0.14]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    found = semantic_duplicates(v, threshold=0.98, rows=[10, 11, 12, 13])
    assert [(d.index, d.of) for d in found] == [(11, 10), (13, 12)]


def test_decontamination_finds_copies_and_long_overlaps():
    held = ["How do I reset my PIN at an ATM?",
            "the quick brown fox jumps over the lazy dog near the river bank today"]
    train = ["how do I reset my PIN at an atm", "something else entirely",
             "yesterday the quick brown fox jumps over the lazy dog near the river bank",
             "the quick brown fox"]
    found = contaminated(train, held, ngram=8, min_overlap=0.5)
    assert [(c.index, c.held_out) for c in found] == [(0, 0), (2, 1)]


def _ex(text: str, label: str, line: int, group: str | None = None) -> Example:
    return Example(text, label, f"train.csv:{line}", group=group, file="train.csv", line=line,
                   record={"text": text, "label": label})


def test_a_kto_row_repeated_with_the_other_label_is_a_conflict_not_a_plain_duplicate():
    """The same prompt and completion labelled desirable and undesirable: file order silently chose the label
    (the second was removed as an exact_duplicate, and no conflict was reported)."""
    def kto(line: int, desirable: bool) -> Example:
        record = {"prompt": "What colour is the sea?", "completion": "blue", "label": desirable}
        return Example("What colour is the sea?", "blue", f"train.jsonl:{line}", file="train.jsonl", line=line,
                       record=record, desirable=desirable)
    cur = Curation(CleanConfig(near_dedup={"enabled": False}, label_noise={"enabled": False}), "generation")
    kept = cur.clean_rows("train", [kto(5, True), kto(6, False), kto(7, True)])
    assert [e.line for e in kept] == [5]
    assert {(r["line"], r["reason"]) for r in cur.removed} == {(6, "exact_duplicate_conflicting_label"),
                                                               (7, "exact_duplicate")}
    assert [[r["desirable"] for r in c["rows"]] for c in cur.conflicts] == [[True, False]]
    assert cur.report()["conflicting_duplicates_total"] == 1


def test_curation_logs_every_removal_with_file_line_and_reason():
    rows = [_ex("Where is my card?", "card", 2), _ex("WHERE is my card", "card", 3),
            _ex("Where is my card?", "pin", 4), _ex("reset pin please, mail x@y.org", "pin", 5),
            _ex("<b>new</b>   card", "card", 6)]
    cfg = CleanConfig(near_dedup={"enabled": False}, label_noise={"enabled": False})
    cur = Curation(cfg)
    kept = cur.clean_rows("train", rows)
    assert [e.line for e in kept] == [2, 5, 6]
    removed = {(r["line"], r["reason"]) for r in cur.removed}
    assert removed == {(3, "exact_duplicate"), (4, "exact_duplicate_conflicting_label")}
    assert all(r["file"] == "train.csv" and "text" in r for r in cur.removed)
    assert kept[1].input == "reset pin please, mail [EMAIL]" and kept[2].input == "new card"
    assert cur.pii_counts == {"email": 1}
    assert {c["line"]: c["changes"] for c in cur.changes} == {5: ["pii:email"], 6: ["html", "whitespace"]}
    assert cur.conflicts and cur.conflicts[0]["rows"][1]["label"] == "pin"
    report = cur.report()
    assert report["removed_by_reason"] == {"exact_duplicate": 1, "exact_duplicate_conflicting_label": 1}
    named = Curation(CleanConfig(pii={"types": ["email", "person"]}, near_dedup={"enabled": False},
                                 label_noise={"enabled": False}))
    kept = named.clean_rows("train", [_ex("My name is Amy Jones, mail amy@y.org", "card", 2)])
    assert kept[0].input == "My name is [PERSON], mail [EMAIL]" and named.pii_counts == {"person": 1, "email": 1}


def test_similar_rows_with_different_labels_are_kept_and_reported():
    rows = [_ex("I cannot find my card anywhere", "lost_card", 2), _ex("I cannot find my code anywhere", "pin", 3)]
    cfg = CleanConfig(near_dedup={"threshold": 0.5}, label_noise={"enabled": False})
    cur = Curation(cfg)
    assert len(cur.clean_rows("train", rows)) == 2
    assert cur.conflicts[0]["kind"] == "near_duplicate"


@pytest.mark.parametrize("action", ["remove", "report"])
def test_near_duplicates_are_removed_or_only_reported(action):
    rows = [_ex("My card has not arrived yet, where is it?", "card", 2), _ex("How do I change my PIN?", "pin", 3),
            _ex("My card has not arived yet, where is it?", "card", 4)]
    cur = Curation(CleanConfig(near_dedup={"action": action, "threshold": 0.7}, label_noise={"enabled": False}))
    kept = cur.clean_rows("train", rows)
    report = cur.report()
    if action == "remove":
        assert [e.line for e in kept] == [2, 3] and [r["line"] for r in cur.removed] == [4]
        assert report["removed_by_reason"] == {"near_duplicate": 1} and not report["kept_duplicates"]
    else:
        assert kept == rows and not cur.removed
        assert report["kept_duplicates_by_kind"] == {"near_duplicate": 1}
        pair = report["kept_duplicates"][0]
        assert [r["line"] for r in pair["rows"]] == [2, 4] and pair["similarity"] >= 0.7


def test_label_noise_ranks_flipped_rows_first():
    from tunesmith.data.label_noise import find_suspects

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 16)) * 4
    y = [i % 3 for i in range(150)]
    x = np.stack([centers[k] + rng.normal(size=16) for k in y])
    labels = [f"c{k}" for k in y]
    flipped = [5, 50, 100]
    for i in flipped:
        labels[i] = f"c{(y[i] + 1) % 3}"
    suspects = find_suspects(x, labels, folds=5)
    assert {s.index for s in suspects[:3]} == set(flipped)
    assert all(s.suggested == f"c{y[s.index]}" for s in suspects[:3])


@pytest.mark.parametrize("labels", [["a"] * 9 + ["b"], ["a", "a", "b"], ["a", "b", "c"], ["a"] * 30 + ["b", "c"]])
def test_label_noise_takes_classes_of_one_row(labels):
    """A fold whose other rows held a single class (one big class beside a one-row class), or labels of one
    row each, made scikit-learn raise (ValueError: internal error, exit 1)."""
    from tunesmith.data.label_noise import find_suspects

    x = np.random.default_rng(1).normal(size=(len(labels), 8))
    suspects = find_suspects(x, labels, folds=5)
    assert all(0 <= s.index < len(labels) and 0 <= s.score <= 1 for s in suspects)


@pytest.mark.parametrize("action", ["report", "remove", "relabel"])
def test_label_noise_actions_log_every_suspect(action):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 16)) * 4
    y = [i % 3 for i in range(90)]
    rows = [_ex(f"message {i}", f"c{(k + 1) % 3 if i in (4, 40) else k}", i + 2) for i, k in enumerate(y)]
    cur = Curation(CleanConfig(label_noise={"action": action}))
    # Vectors given up front: the curation step embeds each text once, so no embedding model is loaded.
    cur._vectors = {e.input: centers[k] + rng.normal(size=16) for e, k in zip(rows, y)}
    out = cur.label_noise(rows)
    flagged = {s["line"] for s in cur.suspects}
    assert {6, 42} <= flagged
    if action == "report":
        assert out == rows and not cur.removed and not cur.changes
    elif action == "remove":
        assert len(out) == len(rows) - len(flagged) and {r["line"] for r in cur.removed} == flagged
    else:
        fixed = {e.line: e.target for e in out}
        assert len(out) == len(rows) and fixed[6] == f"c{y[4]}" and fixed[42] == f"c{y[40]}"
        assert {c["line"] for c in cur.changes} == flagged
        assert all(c["changes"] == ["relabel"] and c["new_label"] != c["old_label"] for c in cur.changes)


def test_group_split_never_splits_a_group():
    groups = [f"user{i // 4}" for i in range(200)]
    labels = [str(i % 3) for i in range(200)]
    rest, held = group_split(list(range(200)), groups, labels, 0.2, seed=1)
    assert not {groups[i] for i in rest} & {groups[i] for i in held}
    assert 30 <= len(held) <= 50 and len(rest) + len(held) == 200


def test_augmentation_marks_rows_and_keeps_labels():
    train = [_ex("my card was declined at the shop today", "declined", 2),
             _ex("how do I change my pin number", "pin", 3), _ex("change pin", "pin", 4)]
    cfg = AugmentConfig(enabled=True, eda=2, char_noise=1, oversample_to=3)
    new = augment(train, cfg)
    kinds = {e.augmented.split(":")[0] for e in new}
    assert kinds == {"eda", "char_noise", "oversample"}
    assert all(e.record is None for e in new)
    by_source = {e.source: e.target for e in train}
    assert all(by_source[e.source] == e.target for e in new)
    assert sum(e.augmented == "oversample" for e in new) == 3  # 'declined' 1 -> 3, 'pin' 2 -> 3
    rng = random.Random(0)
    assert eda("one two three four five six", 0.2, rng) != "one two three four five six"
    assert char_noise("abcdefghij", 0.2, rng) != "abcdefghij"
    assert oversample(train, 1, rng) == []


def test_edits_of_long_texts_are_made_in_one_pass_and_do_what_they_say():
    """redact, char_noise and eda rebuilt the text (or list) once per edit: quadratic, minutes on a
    megabyte row. One-pass versions, checked against what each edit must do."""
    from tunesmith.data.pii import Finding

    text = "a@b.co x " * 2000
    found = find_pii(text)
    slow = text
    for f in sorted(found, key=lambda f: f.start, reverse=True):  # the reference, one finding at a time
        slow = slow[:f.start] + f"[{f.kind.upper()}]" + slow[f.end:]
    assert redact(text, found) == slow == "[EMAIL] x " * 2000
    assert redact("abc", []) == "abc" and redact("abc", [Finding("email", 0, 3)]) == "[EMAIL]"
    words = [f"w{i}" for i in range(200)]
    for seed in range(40):
        out = eda(" ".join(words), 0.2, random.Random(seed)).split()
        kept = [w for w in out if w in words]
        if len(out) < len(words):   # delete: 40 distinct words gone, the rest in order
            assert len(out) == 160 and kept == [w for w in words if w in out]
        elif len(out) > len(words):  # insert: the originals in order, synonyms between them
            assert kept == words
        else:                        # swap or synonym: a permutation of the words, or words replaced
            assert sorted(kept) == sorted(words) or len(kept) < len(words)
    assert eda("one two", 0.5, random.Random(3)).split()  # never every word deleted
    letters = "abcdefghij" * 300
    noisy = char_noise(letters, 0.1, random.Random(2))
    assert noisy != letters and abs(len(noisy) - len(letters)) <= 300


def test_profile_figures():
    assert length_histogram([3, 20, 40, 41, 5000]) == {"0-15": 1, "16-31": 1, "32-63": 2, "4096+": 1}
    assert lexical_diversity(["a b", "a c"]) == {"distinct_1": 0.75, "distinct_2": 1.0}
