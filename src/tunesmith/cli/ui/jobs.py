"""Jobs of `tunesmith ui`: `tunesmith run` child processes started from the "New run" form, stop and
resume, and the routes that show them (their progress, read from the run's own train_log.jsonl: progress.py).

A job is one child process at a time in its own session (so a stop reaches everything it started),
its output in ROOT/.tunesmith-ui/jobs/ID/log.txt and its record in job.json beside it (written
atomically at every change), so the job list survives a restart of the workbench: a job that was
running when the workbench went away is "interrupted" if its process is gone (resume it), "orphaned"
if it still runs (listed, and Stop still reaches it: its process is recognised by its start time, so a
recycled pid is never signalled). A watcher thread per job waits on the child, which reaps it;
shutting the app down stops every running child it started.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from tunesmith import fsio
from tunesmith.cli.ui import form
from tunesmith.cli.ui.layout import esc, page
from tunesmith.cli.ui.progress import event_stream, last_event
from tunesmith.cli.ui.scan import UI_DIR
from tunesmith.cli.ui.security import csrf, inside_root
from tunesmith.runs import interrupted_run, is_run_dir

router = APIRouter()
router.include_router(form.router)

log = logging.getLogger(__name__)

KEPT_JOBS = 50            # jobs remembered (the oldest finished one is forgotten first) and reloaded at start
STOP_GRACE_S = 30.0       # SIGTERM, then SIGKILL to what is left of the group after this long
MAX_STREAMS = 8           # live event streams per job (a reconnecting page holds one)
MAX_RECORD_BYTES = 256 * 1024  # a job.json larger than this is not one the workbench wrote
LIVE = ("running", "orphaned")  # states whose process runs (both count against --max-jobs)
# The trainer's own progress bar in the child's output: "train (lora):  50%|...| 3/6 [00:06<00:06, ...".


@dataclass
class Job:
    """One `tunesmith run` (and, after a resume, `train --resume` then `eval`) in the workbench."""

    id: str
    name: str
    config: Path
    out: Path
    folder: Path                         # ROOT/.tunesmith-ui/jobs/ID: log.txt, job.json
    state: str = "running"               # running | done | failed | stopped | interrupted | orphaned
    exit_code: int | None = None
    command: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    ended: float | None = None
    pid: int | None = None
    pgid: int | None = None
    pid_start: str | None = None         # the process's start time (/proc/PID/stat): tells a recycled pid
    stopping: bool = False
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.folder / "log.txt"

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def to_json(self, root: Path) -> dict:
        return {"id": self.id, "name": self.name, "state": self.state, "exit_code": self.exit_code,
                "config": _rel(self.config, root), "out": _rel(self.out, root),
                "command": " ".join(self.command), "started": self.started, "ended": self.ended,
                "run_dir": _rel(self.out, root) if is_run_dir(self.out) else None}

    def record(self) -> dict:
        """What job.json keeps: enough to list the job, resume it, or stop its process after a restart."""
        return {key: getattr(self, key) for key in _RECORD}


_RECORD = ("id", "name", "config", "out", "commands", "command", "pid", "pgid", "pid_start", "state",
           "exit_code", "started", "ended")


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _tunesmith(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunesmith", *args]


class JobManager:
    """Starts, stops and resumes `tunesmith run` child processes, at most `max_jobs` at once; reloads
    the newest KEPT_JOBS job records of ROOT/.tunesmith-ui/jobs when it starts."""

    def __init__(self, root: Path, max_jobs: int = 1) -> None:
        self.root = Path(root).resolve()
        self.max_jobs = max_jobs
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.streams: Counter[str] = Counter()  # open event streams per job id
        self.lock = threading.Lock()
        self._reload()

    def start(self, config_path: Path, out: Path, name: str = "run") -> Job:
        """`tunesmith run CONFIG --out OUT` as a new job. HTTPException 409 when max_jobs already run."""
        return self.launch([_tunesmith("run", str(config_path), "--out", str(out))], config_path, out, name)

    def launch(self, commands: list[list[str]], config_path: Path, out: Path, name: str,
               job: Job | None = None) -> Job:
        """Run `commands` one after another (the next only after an exit 0) as `job`, or a new one.
        HTTPException 409 when `job` runs already (a double-clicked Resume) or max_jobs jobs run."""
        with self.lock:
            if job is not None and job.live:
                raise HTTPException(409, f"job {job.id} is already running")
            self.check_capacity()
            if job is None:
                job_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
                job = Job(job_id, name, Path(config_path), Path(out), self._job_folder(job_id))
                self.jobs[job.id] = job
                self._forget_old()
            job.state, job.exit_code, job.ended, job.stopping = "running", None, None, False
            job.commands = [list(c) for c in commands]
            started = self._spawn(job, commands[0])
        if started:
            threading.Thread(target=self._watch, args=(job, commands), daemon=True, name=f"job-{job.id}").start()
        return job

    def _job_folder(self, job_id: str) -> Path:
        """ROOT/.tunesmith-ui/jobs/ID, created, refused (409) where a symlink would lead it out of the root."""
        rel = f"{UI_DIR}/jobs/{job_id}"
        try:
            inside_root(self.root, rel).mkdir(parents=True, exist_ok=True)
            return inside_root(self.root, rel)
        except HTTPException:
            raise HTTPException(409, f"{self.root / UI_DIR} leads outside the root: job logs are not written "
                                     "there; remove the link") from None

    def check_capacity(self) -> None:
        """HTTPException 409 when max_jobs jobs are running already."""
        if self.running() >= self.max_jobs:
            raise HTTPException(409, f"{self.max_jobs} job(s) already running (tunesmith ui --max-jobs "
                                     f"{self.max_jobs}); stop one or wait for it to finish")

    def running(self) -> int:
        return sum(1 for j in self.jobs.values() if j.live)

    def snapshot(self) -> list[Job]:
        """The jobs, oldest first, copied under the lock (a start may forget an old job meanwhile)."""
        with self.lock:
            return list(self.jobs.values())

    def _forget_old(self) -> None:
        finished = [j.id for j in self.jobs.values() if not j.live]
        for job_id in finished[: max(0, len(self.jobs) - KEPT_JOBS)]:
            del self.jobs[job_id]

    def _spawn(self, job: Job, command: list[str]) -> bool:
        """Start `command` as the job's process (the caller holds the lock); False, with the job failed
        and the reason in its log, when it cannot be started."""
        job.command = command
        try:
            self._job_folder(job.id)  # still inside the root (a link may have replaced it since)
            with open(job.log, "ab") as out:  # the child holds its own copy of the descriptor
                out.write(f"$ {' '.join(command)}\n".encode())
                out.flush()
                job.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, cwd=self.root, start_new_session=True)
        except (OSError, HTTPException) as e:
            reason = e.detail if isinstance(e, HTTPException) else f"{type(e).__name__}: {e}"
            self._note(job, f"error: could not start {command[0]}: {reason}")
            job.process, job.pid, job.pgid, job.pid_start = None, None, None, None
            self._finish(job, None, "failed")
            return False
        job.pid = job.pgid = job.process.pid
        job.pid_start = _start_time(job.pid)
        self._save(job)
        return True

    def _note(self, job: Job, line: str) -> None:
        try:
            with open(inside_root(self.root, f"{UI_DIR}/jobs/{job.id}/log.txt"), "a", encoding="utf-8") as out:
                out.write(line + "\n")
        except (OSError, HTTPException):
            pass  # the log cannot be written (or leads out of the root): job.json still says the job failed
        log.warning("job %s: %s", job.id, line)

    def _finish(self, job: Job, code: int | None, state: str) -> None:
        ended = time.time()
        # job.json first: whoever sees the job end in memory (a poll, a listing) finds it ended on disk too
        self._save(job, {**job.record(), "exit_code": code, "ended": ended, "state": state})
        job.exit_code, job.ended, job.state = code, ended, state

    def _save(self, job: Job, record: dict | None = None) -> None:
        """job.json (`record`, or the job's own), atomically (temp file and rename); a failure costs only
        the record after a restart."""
        try:
            target = inside_root(self.root, f"{UI_DIR}/jobs/{job.id}/job.json")
            fsio.write_json(target, job.record() if record is None else record)
        except (OSError, HTTPException) as e:
            log.warning("job %s: job.json not written: %s", job.id, getattr(e, "detail", e))

    def _watch(self, job: Job, commands: list[list[str]]) -> None:
        """Wait for each command (this reaps it), start the next after an exit 0, record the end."""
        code = None
        for i in range(len(commands)):
            if i:
                with self.lock:
                    if job.stopping:
                        break
                    if not self._spawn(job, commands[i]):
                        return  # failed, and said why in its log
            code = job.process.wait()
            if job.stopping:
                _signal_group(job.pgid, signal.SIGKILL)  # whatever the leader left behind
            if code != 0 or job.stopping:
                break
        with self.lock:
            # 3: the run finished and was judged, and the objective was not met: a finished run.
            self._finish(job, code, "stopped" if job.stopping else ("done" if code in (0, 3) else "failed"))

    def get(self, job_id: str) -> Job:
        with self.lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} in this workbench")
        return job

    def stop(self, job_id: str) -> Job:
        """SIGTERM to the job's process group; SIGKILL to the group after STOP_GRACE_S. An orphaned job
        (started before a restart) is signalled only while its process is still the one it started."""
        job = self.get(job_id)
        with self.lock:
            if not job.live:
                raise HTTPException(409, f"job {job_id} is not running (it is {job.state})")
            if job.state == "orphaned" and not _same_process(job.pid, job.pid_start):
                self._finish(job, None, "interrupted")
                raise HTTPException(409, f"job {job_id} is not running any more (it is interrupted)")
            job.stopping = True
            process, pgid = job.process, job.pgid
        _signal_group(pgid, signal.SIGTERM)
        if process is not None:  # an orphan's watcher (_watch_orphan) kills it after the grace time
            threading.Thread(target=_kill_after, args=(process, pgid, STOP_GRACE_S), daemon=True).start()
        return job

    def resume(self, job_id: str) -> Job:
        """Continue a stopped, failed or interrupted job's training (`tunesmith train --resume OUT`), then
        evaluate it (`tunesmith eval OUT`): what the CLI can resume. HTTPException 409 when there is
        nothing to resume, or the job runs already."""
        from tunesmith.errors import RunDirError
        from tunesmith.train.checkpoint import list_checkpoints

        job = self.get(job_id)
        if job.live:
            raise HTTPException(409, f"job {job_id} is still running")
        try:
            final, staging = interrupted_run(job.out)
        except RunDirError as e:
            raise HTTPException(409, e.line()) from None
        if not list_checkpoints(staging / "checkpoints"):
            raise HTTPException(409, f"error: no checkpoint to resume from, {staging}, the run stopped before its "
                                     "first checkpoint (train.checkpoint_every steps); start it anew")
        commands = [_tunesmith("train", "--resume", str(final)), _tunesmith("eval", str(final))]
        return self.launch(commands, job.config, job.out, job.name, job)  # re-checks, under the lock

    def open_stream(self, job_id: str) -> Callable[[], None]:
        """Count one more event stream of the job (HTTPException 429 past MAX_STREAMS); returns its
        release, which counts only its first call (at the stream's end, or when the stream is collected)."""
        with self.lock:
            if self.streams[job_id] >= MAX_STREAMS:
                raise HTTPException(429, f"{MAX_STREAMS} pages already follow job {job_id}: close one")
            self.streams[job_id] += 1
        released = threading.Event()

        def release() -> None:
            with self.lock:
                if not released.is_set():
                    released.set()
                    self.streams[job_id] -= 1
        return release

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop every running child (the app is shutting down): SIGTERM, SIGKILL after `grace` seconds.
        Orphaned jobs, started by an earlier workbench, are left as they are."""
        with self.lock:
            live = [j for j in self.jobs.values() if j.state == "running" and j.process is not None]
            for job in live:
                job.stopping = True
        for job in live:
            _signal_group(job.pgid, signal.SIGTERM)
        for job in live:
            _kill_after(job.process, job.pgid, grace)

    # -- after a restart ---------------------------------------------------------------------------

    def _reload(self) -> None:
        """The newest KEPT_JOBS job records: a job that was running is orphaned if its process still runs,
        else interrupted (its record is updated)."""
        try:
            folder = inside_root(self.root, f"{UI_DIR}/jobs")
            names = heapq.nlargest(KEPT_JOBS, (e.name for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)))
        except (HTTPException, OSError):
            return  # no jobs yet, or the folder leads outside the root
        for name in sorted(names):
            job = self._load(folder / name)
            if job is None:
                continue
            self.jobs[job.id] = job
            if job.state in LIVE:
                if _same_process(job.pid, job.pid_start) and _started_here(job):
                    job.state = "orphaned"
                    threading.Thread(target=self._watch_orphan, args=(job,), daemon=True,
                                     name=f"job-{job.id}").start()
                else:
                    job.state, job.ended = "interrupted", job.ended or time.time()
                self._save(job)

    def _load(self, folder: Path) -> Job | None:
        """The job of a job.json the workbench wrote, or None (with a warning) for anything else."""
        path = folder / "job.json"
        try:
            if path.is_symlink() or path.stat().st_size > MAX_RECORD_BYTES:
                return None
            data = json.loads(path.read_text(encoding="utf-8"))
            job = Job(id=str(data["id"]), name=str(data["name"]), config=Path(data["config"]), out=Path(data["out"]),
                      folder=folder, state=str(data["state"]), exit_code=_int(data.get("exit_code")),
                      command=[str(c) for c in data.get("command") or []],
                      commands=[[str(c) for c in cmd] for cmd in data.get("commands") or []],
                      started=float(data.get("started") or 0), ended=_float(data.get("ended")),
                      pid=_int(data.get("pid")), pgid=_int(data.get("pid")),  # its own group (start_new_session)
                      pid_start=None if data.get("pid_start") is None else str(data["pid_start"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else e
            log.warning("%s: not a job record, skipped (%s)", path, why)
            return None
        inside = all(p.resolve().is_relative_to(self.root) for p in (job.config, job.out))
        return job if job.id == folder.name and inside else None  # never a path out of the root

    def _watch_orphan(self, job: Job, poll: float = 0.5) -> None:
        """Wait for an orphaned job's process to end (it is not our child: poll /proc), record the end;
        once it is stopped, SIGKILL its group if it outlives STOP_GRACE_S (while it is still that process)."""
        deadline = None
        while _same_process(job.pid, job.pid_start):
            deadline = deadline or (time.time() + STOP_GRACE_S if job.stopping else None)
            if deadline and time.time() >= deadline:
                _signal_group(job.pgid, signal.SIGKILL)
            time.sleep(poll)
        with self.lock:
            if job.state == "orphaned":  # its exit code went to the process that started it
                self._finish(job, None, "stopped" if job.stopping else "interrupted")


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _start_time(pid: int | None) -> str | None:
    """The start time of process `pid` (field 22 of /proc/PID/stat, clock ticks since boot), None when
    it is gone, a zombie, or the system has no /proc: with the pid it names one process, never a
    later one that reuses the pid."""
    if pid is None or pid <= 0:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _same_process(pid: int | None, start: str | None) -> bool:
    return start is not None and _start_time(pid) == start


def _started_here(job: Job) -> bool:
    """Whether the process a reloaded record names can be the job a workbench started: a `python -m
    tunesmith` command (the record's, argument for argument) leading its own session, and not this
    process. A job.json is a file under the root, which a cloned or unpacked folder can bring: Stop must
    never signal a process (or group) that a forged record names."""
    pid = job.pid
    if pid is None or pid == os.getpid() or job.command[1:3] != ["-m", "tunesmith"]:
        return False
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    except (OSError, IndexError):
        return False
    leads = fields[2] == fields[3] == str(pid)  # process group and session are its own
    return leads and [a.decode("utf-8", "surrogateescape") for a in argv] == job.command


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
    return JSONResponse({"jobs": [j.to_json(manager.root) for j in reversed(manager.snapshot())]})


@router.get("/api/jobs/{job_id}")
def job_status(job_id: str, request: Request) -> JSONResponse:
    manager = _manager(request)
    return JSONResponse(manager.get(job_id).to_json(manager.root))


@router.get("/api/jobs/{job_id}/events")
def job_events(job_id: str, request: Request) -> StreamingResponse:
    manager = _manager(request)
    job = manager.get(job_id)
    release = manager.open_stream(job_id)  # 429 past MAX_STREAMS
    stream = event_stream(manager, job, resume=last_event(request.headers.get("last-event-id")), release=release)
    weakref.finalize(stream, release)  # a stream dropped before it started never runs its finally
    return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-store"})


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
