"""Jobs of `tunesmith ui`: `tunesmith run` child processes started from the "New run" form, their
progress read from the run's own train_log.jsonl, stop and resume, and the routes that show them.

A job is one child process at a time in its own session (so a stop reaches everything it started),
its output in ROOT/.tunesmith-ui/jobs/ID/log.txt. A watcher thread per job waits on the child, which
reaps it; shutting the app down stops every running child.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from tunesmith.cli.ui import form
from tunesmith.cli.ui.layout import esc, page
from tunesmith.cli.ui.security import csrf
from tunesmith.runs import interrupted_run, is_run_dir, staging_dir

router = APIRouter()
router.include_router(form.router)

UI_DIR = ".tunesmith-ui"
KEPT_JOBS = 50            # finished jobs remembered (the oldest finished one is forgotten first)
STOP_GRACE_S = 30.0       # SIGTERM, then SIGKILL to what is left of the group after this long
TAIL_BYTES = 64 * 1024    # most of a log read per poll: bounded memory per connection
POLL_S = 0.5
# The trainer's own progress bar in the child's output: "train (lora):  50%|...| 3/6 [00:06<00:06, ...".
# Linear-time: no nested quantifiers; it only ever sees the last TAIL_BYTES of our child's output.
_BAR = re.compile(r"(\d{1,12})/(\d{1,12}) \[(?:\d{1,6}:)?\d{1,2}:\d{2}<((?:\d{1,6}:)?\d{1,2}:\d{2}|\?)")


@dataclass
class Job:
    """One `tunesmith run` (and, after a resume, `train --resume` then `eval`) in the workbench."""

    id: str
    name: str
    config: Path
    out: Path
    folder: Path                         # ROOT/.tunesmith-ui/jobs/ID: log.txt
    state: str = "running"               # running | done | failed | stopped
    exit_code: int | None = None
    command: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    pgid: int | None = None
    stopping: bool = False
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.folder / "log.txt"

    def to_json(self, root: Path) -> dict:
        return {"id": self.id, "name": self.name, "state": self.state, "exit_code": self.exit_code,
                "config": _rel(self.config, root), "out": _rel(self.out, root),
                "command": " ".join(self.command), "started": self.started, "ended": self.ended,
                "run_dir": _rel(self.out, root) if is_run_dir(self.out) else None}


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _tunesmith(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunesmith", *args]


class JobManager:
    """Starts, stops and resumes `tunesmith run` child processes, at most `max_jobs` at once."""

    def __init__(self, root: Path, max_jobs: int = 1) -> None:
        self.root = Path(root).resolve()
        self.max_jobs = max_jobs
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()

    def start(self, config_path: Path, out: Path, name: str = "run") -> Job:
        """`tunesmith run CONFIG --out OUT` as a new job. HTTPException 409 when max_jobs already run."""
        return self.launch([_tunesmith("run", str(config_path), "--out", str(out))], config_path, out, name)

    def launch(self, commands: list[list[str]], config_path: Path, out: Path, name: str,
               job: Job | None = None) -> Job:
        """Run `commands` one after another (the next only after an exit 0) as `job`, or a new one."""
        with self.lock:
            self.check_capacity()
            if job is None:
                job_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
                job = Job(job_id, name, Path(config_path), Path(out), self.root / UI_DIR / "jobs" / job_id)
                self.jobs[job.id] = job
                self._forget_old()
            job.state, job.exit_code, job.ended, job.stopping = "running", None, None, False
            job.folder.mkdir(parents=True, exist_ok=True)
            self._spawn(job, commands[0])
        threading.Thread(target=self._watch, args=(job, commands), daemon=True, name=f"job-{job.id}").start()
        return job

    def check_capacity(self) -> None:
        """HTTPException 409 when max_jobs jobs are running already."""
        if self.running() >= self.max_jobs:
            raise HTTPException(409, f"{self.max_jobs} job(s) already running (tunesmith ui --max-jobs "
                                     f"{self.max_jobs}); stop one or wait for it to finish")

    def running(self) -> int:
        return sum(1 for j in self.jobs.values() if j.state == "running")

    def _forget_old(self) -> None:
        finished = [j.id for j in self.jobs.values() if j.state != "running"]
        for job_id in finished[: max(0, len(self.jobs) - KEPT_JOBS)]:
            del self.jobs[job_id]

    def _spawn(self, job: Job, command: list[str]) -> None:
        with open(job.log, "ab") as log:  # the child holds its own copy of the descriptor
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            job.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           cwd=self.root, start_new_session=True)
        job.command, job.pgid = command, job.process.pid

    def _watch(self, job: Job, commands: list[list[str]]) -> None:
        """Wait for each command (this reaps it), start the next after an exit 0, record the end."""
        for i in range(len(commands)):
            if i:
                with self.lock:
                    if job.stopping:
                        break
                    self._spawn(job, commands[i])
            code = job.process.wait()
            if job.stopping:
                _signal_group(job.pgid, signal.SIGKILL)  # whatever the leader left behind
            if code != 0 or job.stopping:
                break
        with self.lock:
            job.exit_code = code
            job.ended = time.time()
            # 3: the run finished and was judged, and the objective was not met: a finished run.
            job.state = "stopped" if job.stopping else ("done" if code in (0, 3) else "failed")

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} in this workbench session")
        return job

    def stop(self, job_id: str) -> Job:
        """SIGTERM to the job's process group; SIGKILL to the group after STOP_GRACE_S."""
        job = self.get(job_id)
        with self.lock:
            if job.state != "running":
                raise HTTPException(409, f"job {job_id} is not running (it is {job.state})")
            job.stopping = True
            process, pgid = job.process, job.pgid
        _signal_group(pgid, signal.SIGTERM)
        threading.Thread(target=_kill_after, args=(process, pgid, STOP_GRACE_S), daemon=True).start()
        return job

    def resume(self, job_id: str) -> Job:
        """Continue a stopped or failed job's training (`tunesmith train --resume OUT`), then evaluate it
        (`tunesmith eval OUT`): what the CLI can resume. HTTPException 409 when there is nothing to resume."""
        from tunesmith.errors import RunDirError
        from tunesmith.train.checkpoint import list_checkpoints

        job = self.get(job_id)
        if job.state == "running":
            raise HTTPException(409, f"job {job_id} is still running")
        try:
            final, staging = interrupted_run(job.out)
        except RunDirError as e:
            raise HTTPException(409, e.line()) from None
        if not list_checkpoints(staging / "checkpoints"):
            raise HTTPException(409, f"error: no checkpoint to resume from, {staging}, the run stopped before its "
                                     "first checkpoint (train.checkpoint_every steps); start it anew")
        commands = [_tunesmith("train", "--resume", str(final)), _tunesmith("eval", str(final))]
        return self.launch(commands, job.config, job.out, job.name, job)

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop every running child (the app is shutting down): SIGTERM, SIGKILL after `grace` seconds."""
        with self.lock:
            live = [j for j in self.jobs.values() if j.state == "running"]
            for job in live:
                job.stopping = True
        for job in live:
            _signal_group(job.pgid, signal.SIGTERM)
        for job in live:
            _kill_after(job.process, job.pgid, grace)


def _signal_group(pgid: int | None, sig: int) -> None:
    if pgid is None:
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def _kill_after(process: subprocess.Popen | None, pgid: int | None, grace: float) -> None:
    """SIGKILL the group if its leader has not exited after `grace` seconds (the watcher reaps it)."""
    if process is None:
        return
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        _signal_group(pgid, signal.SIGKILL)


# -- progress: the run's own train_log.jsonl and the trainer's progress bar ----------------------------

class Progress:
    """Reads a job's progress incrementally: new train_log.jsonl records (in the staging folder while the
    run is built, in the run directory once it is in place) and the last progress bar of its output."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.offset, self.inode, self.partial = 0, None, b""
        self.total, self.eta_s, self.phase = None, None, None
        self.max_steps = _max_steps(job.config)

    def records(self) -> list[dict]:
        """train_log.jsonl records written since the last call (at most TAIL_BYTES of them)."""
        path = next((p for p in (staging_dir(self.job.out) / "train_log.jsonl", self.job.out / "train_log.jsonl")
                     if p.is_file()), None)
        if path is None:
            return []
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != self.inode or st.st_size < self.offset:  # a resume rewrote it
                self.inode, self.offset, self.partial = (st.st_dev, st.st_ino), 0, b""
            f.seek(self.offset)
            chunk = f.read(TAIL_BYTES)
        self.offset += len(chunk)
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()[-TAIL_BYTES:]
        out = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
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
        for r in self.records():
            if "overfitting" in r:
                out.append({"type": "overfitting", "step": r.get("step"), "flag": r["overfitting"]})
            elif "val_loss" in r:
                out.append({"type": "validation", **r})
            elif "loss" in r:
                total = self.total or self.max_steps  # train.max_steps is the trainer's total when set
                out.append({"type": "progress", "step": r.get("step"), "epoch": r.get("epoch"),
                            "loss": r.get("loss"), "lr": r.get("lr"), "total": total,
                            "eta_s": self.eta_s if self.total else None, "phase": self.phase})
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

    try:
        raw = yaml.safe_load(config.read_text(encoding="utf-8"))
        value = raw.get("train", {}).get("max_steps")
    except (OSError, AttributeError, yaml.YAMLError):
        return None
    return value if isinstance(value, int) and value > 0 else None


async def event_stream(manager: JobManager, job: Job, poll: float = POLL_S):
    """Server-sent events: progress until the job ends, then one status event."""
    progress = Progress(job)
    yield _sse({"type": "status", **job.to_json(manager.root)})
    while True:
        ended = job.state != "running"
        for event in await asyncio.to_thread(progress.events):
            yield _sse(event)
        if ended:  # read once more after the end, so the last records are sent
            yield _sse({"type": "status", **job.to_json(manager.root)})
            return
        await asyncio.sleep(poll)


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


# -- routes ----------------------------------------------------------------------------------------

def _manager(request: Request) -> JobManager:
    return request.app.state.ui.jobs


@router.post("/api/jobs", dependencies=[Depends(csrf)])
async def start_job(request: Request) -> JSONResponse:
    """Validate the form's values, save them as a new config file and start `tunesmith run` on it."""
    values = await form.read_values(request)
    manager = _manager(request)
    manager.check_capacity()  # before anything is written
    config, out, name = await asyncio.to_thread(form.save_config, manager.root, values)
    try:
        job = manager.start(config, out, name)
    except HTTPException:
        config.unlink(missing_ok=True)  # the file this request just created: no job will use it
        raise
    return JSONResponse({"id": job.id, **job.to_json(manager.root)})


@router.get("/api/jobs")
def list_jobs(request: Request) -> JSONResponse:
    manager = _manager(request)
    return JSONResponse({"jobs": [j.to_json(manager.root) for j in reversed(manager.jobs.values())]})


@router.get("/api/jobs/{job_id}")
def job_status(job_id: str, request: Request) -> JSONResponse:
    manager = _manager(request)
    return JSONResponse(manager.get(job_id).to_json(manager.root))


@router.get("/api/jobs/{job_id}/events")
def job_events(job_id: str, request: Request) -> StreamingResponse:
    manager = _manager(request)
    job = manager.get(job_id)
    return StreamingResponse(event_stream(manager, job), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})


@router.post("/api/jobs/{job_id}/stop", dependencies=[Depends(csrf)])
def stop_job(job_id: str, request: Request) -> JSONResponse:
    manager = _manager(request)
    return JSONResponse(manager.stop(job_id).to_json(manager.root))


@router.post("/api/jobs/{job_id}/resume", dependencies=[Depends(csrf)])
def resume_job(job_id: str, request: Request) -> JSONResponse:
    manager = _manager(request)
    return JSONResponse(manager.resume(job_id).to_json(manager.root))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request) -> HTMLResponse:
    """A job's live page: state, step / total, loss, validation figures, ETA; stop and resume buttons."""
    manager = _manager(request)
    job = manager.get(job_id)
    info = job.to_json(manager.root)
    body = (f"<h1>Run {esc(job.name)}</h1><section id='job' data-job='{esc(job.id)}'>"
            f"<p>State: <strong id='job-state'>{esc(job.state)}</strong> <span id='job-exit'></span></p>"
            f"<p>Config: <code>{esc(info['config'])}</code>; run directory: <code>{esc(info['out'])}</code></p>"
            "<p><progress id='job-progress' max='1' value='0'></progress> <span id='job-step'></span> "
            "<span id='job-eta'></span> <span id='job-phase'></span></p>"
            "<p>Loss: <span id='job-loss'>-</span></p>"
            "<canvas id='job-chart' width='640' height='220' aria-label='loss and validation curves'></canvas>"
            "<table id='job-validation'><thead><tr><th>step</th><th>val_loss</th><th>figures</th></tr></thead>"
            "<tbody></tbody></table><ul id='job-flags'></ul>"
            "<p><button type='button' id='job-stop'>Stop</button> "
            "<button type='button' id='job-resume'>Resume</button> "
            "<a id='job-run' hidden>Open the run</a></p><p id='job-error' role='alert'></p>"
            f"<p>Output: <code>{esc(_rel(job.log, manager.root))}</code></p></section>")
    return page(request, f"Run {job.name}", body, ["jobs.js"])
