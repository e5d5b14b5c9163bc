"""Rebuild the QA example's rows from XQuAD English (a SQuAD v1.1 dev subset, CC BY-SA 4.0, see data/SOURCE.md).

Paragraphs are taken in a seeded shuffle, skipping ones longer than MAX_CONTEXT_CHARS (to keep training and
evaluation inside this example's time budget), until PARAGRAPHS are taken; every question of a taken paragraph
becomes one row {prompt, completion, context_id, article, id}. `context_id` names the paragraph: the project
splits by it (data.group_field), so no context is seen in two splits.
Run from this folder: python make_data.py ../../../shared/data/xquad_en_squad11_dev_subset
"""

import json
import random
import sys
from pathlib import Path

PARAGRAPHS = 80
MAX_CONTEXT_CHARS = 700
SEED = 11


def rows_of(article: dict, index: int, paragraph: dict) -> list[dict]:
    context_id = f"{article['title']}#{index}"
    return [{"prompt": f"Context: {paragraph['context']}\n\nQuestion: {qa['question'].strip()}",
             # XQuAD keeps one gold answer per question (`answers` repeats it, for reference); scoring uses `completion`.
             "completion": qa["answers"][0]["text"], "answers": [a["text"] for a in qa["answers"]],
             "context_id": context_id, "article": article["title"], "id": qa["id"]}
            for qa in paragraph["qas"]]


def main(src: Path) -> None:
    data = json.loads((src / "xquad.en.json").read_text(encoding="utf-8"))["data"]
    paragraphs = [(a, i, p) for a in data for i, p in enumerate(a["paragraphs"])]
    random.Random(SEED).shuffle(paragraphs)
    taken = [p for p in paragraphs if len(p[2]["context"]) <= MAX_CONTEXT_CHARS][:PARAGRAPHS]
    rows = [row for a, i, p in taken for row in rows_of(a, i, p)]
    with open(Path(__file__).parent / "data" / "qa.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    print(f"{len(rows)} questions from {len(taken)} paragraphs")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
