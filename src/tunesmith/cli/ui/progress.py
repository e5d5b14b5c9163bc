"""Progress of a `tunesmith ui` job: new records of the run's own train_log.jsonl (in the staging folder
while the run is built, in the run directory once it is in place), the trainer's progress bar from the
job's output, and the server-sent event stream that carries them to the job page."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunesmith.runs import staging_dir

# A job is jobs.Job and a manager jobs.JobManager; typed Any here because jobs.py imports this module.
Job = JobManager = Any

POLL_S = 0.5
TAIL_BYTES = 64 * 1024    # most of a log read per poll: bounded memory per connection
# Linear-time: no nested quantifiers; it only ever sees the last TAIL_BYTES of our child's output.
_BAR = re.compile(r"(\d{1,12})/(\d{1,12}) \[(?:\d{1,6}:)?\d{1,2}:\d{2}<((?:\d{1,6}:)?\d{1,2}:\d{2}|\?)")
_EVENT_ID = re.compile(r"(\d{1,20})-(\d{1,20})")  # "INODE-OFFSET" of the job's train_log.jsonl


# -- progress: the run's own train_log.jsonl and the trainer's progress bar ----------------------------

class Progress:
    """Reads a job's progress incrementally: new train_log.jsonl records (in the staging folder while the
    run is built, in the run directory once it is in place) and the last progress bar of its output."""

    def __init__(self, job: Job, resume: tuple[int, int] | None = None) -> None:
        self.job = job
        # Where a reconnecting page's last event left off (its Last-Event-ID): the log's inode and the
        # offset after the last record it got; a rewritten log (another inode, or shorter) starts over.
        self.inode, self.offset = resume or (None, 0)
        self.total, self.eta_s, self.phase = None, None, None
        self.max_steps = _max_steps(job.config)

    def records(self) -> list[tuple[dict, int]]:
        """train_log.jsonl records written since the last call (at most TAIL_BYTES of them), each with the
        offset just after it."""
        path = next((p for p in (staging_dir(self.job.out) / "train_log.jsonl", self.job.out / "train_log.jsonl")
                     if p.is_file()), None)
        if path is None:
            return []
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_ino != self.inode or st.st_size < self.offset:  # a resume rewrote it
                self.inode, self.offset = st.st_ino, 0
            f.seek(self.offset)
            chunk = f.read(TAIL_BYTES)
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        if end == 0 and len(chunk) == TAIL_BYTES:
            end = len(chunk)  # a line longer than TAIL_BYTES is no progress record: skip its head
        pieces = chunk[:end].split(b"\n")
        pieces.pop()  # after the last newline: empty, or the skipped head of an over-long line
        out, pos = [], self.offset
        for line in pieces:
            pos += len(line) + 1
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                out.append((record, pos))
        self.offset += end
        return out

    def bar(self) -> None:
        """The trainer's latest progress bar in the job's output: total steps and its ETA."""
        try:
            with open(self.job.log, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
                tail = f.read().decode("utf-8", "replace")
        except OSError:
            return
        segment = re.split(r"[\r\n]", tail.rstrip())[-1]
        self.phase = segment.split(":", 1)[0].strip()[:40] or None
        if not segment.startswith("train ("):
            return
        match = _BAR.search(segment)
        if match:
            self.total = int(match.group(2))
            self.eta_s = None if match.group(3) == "?" else _seconds(match.group(3))

    def events(self) -> list[dict]:
        """The events since the last call: progress (step, loss, ETA), validation records, overfitting flags."""
        self.bar()
        out = []
        for r, end in self.records():
            where = {"id": f"{self.inode}-{end}"}  # the SSE id: a reconnect continues after this record
            if "overfitting" in r:
                out.append({"type": "overfitting", "step": r.get("step"), "flag": r["overfitting"], **where})
            elif "val_loss" in r:
                out.append({"type": "validation", **r, **where})
            elif "loss" in r:
                total = self.total or self.max_steps  # train.max_steps is the trainer's total when set
                out.append({"type": "progress", "step": r.get("step"), "epoch": r.get("epoch"),
                            "loss": r.get("loss"), "lr": r.get("lr"), "total": total,
                            "eta_s": self.eta_s if self.total else None, "phase": self.phase, **where})
        if not out and self.phase:
            out.append({"type": "phase", "phase": self.phase})
        return out


def _seconds(text: str) -> int:
    seconds = 0
    for part in text.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds


def _max_steps(config: Path) -> int | None:
    """train.max_steps of the job's config: then the trainer's total (trainer.make_plan); else unknown here."""
    import yaml

    from tunesmith.config import yaml_text

    try:
        raw = yaml_text.safe_load(config.read_text(encoding="utf-8"))
        value = raw.get("train", {}).get("max_steps")
    except (OSError, AttributeError, yaml.YAMLError):
        return None
    return value if isinstance(value, int) and value > 0 else None


async def event_stream(manager: JobManager, job: Job, poll: float = POLL_S, resume: tuple[int, int] | None = None,
                       release: Callable[[], None] | None = None):
    """Server-sent events: progress until the job ends, then one status event. Each record's event has
    an `id:` (the log's inode and the offset after the record): the browser sends the last one back as
    Last-Event-ID when it reconnects, and the stream continues from there (`resume`)."""
    progress = Progress(job, resume)
    try:
        yield _sse({"type": "status", **job.to_json(manager.root)})
        while True:
            ended = not job.live
            for event in await asyncio.to_thread(progress.events):
                yield _sse(event)
            if ended:  # read once more after the end, so the last records are sent
                yield _sse({"type": "status", **job.to_json(manager.root)})
                return
            await asyncio.sleep(poll)
    finally:
        if release is not None:
            release()


def _sse(event: dict) -> str:
    event_id = event.pop("id", None)
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event['type']}\ndata: {json.dumps(event)}\n\n"


def last_event(header: str | None) -> tuple[int, int] | None:
    """(inode, offset) of a Last-Event-ID this stream sent, else None (start from the beginning)."""
    match = _EVENT_ID.fullmatch(header.strip()) if header and len(header) <= 64 else None
    return (int(match.group(1)), int(match.group(2))) if match else None
