"""The production loop end to end on real data: serve, drift, feedback, monitor, retrain, promote.

    python benchmarks/loop_demo.py [--work DIR] [--champion RUN_DIR] [--port N]

1. Trains the drift example (examples/drift/project.yaml: the quickstart's eight BANKING77 intents),
   or copies --champion, and promotes it under the registry name `banking-drift`.
2. Starts `tunesmith serve --registry banking-drift` and sends the `normal` traffic of
   examples/drift/traffic.csv, then the `shifted` traffic (three intents the model never saw), each
   answer followed by its true label on POST /v1/feedback; `tunesmith monitor` after each phase.
3. Runs `tunesmith retrain --registry banking-drift` (the champion; exit 0 promoted, 3 rejected) and,
   once the server has swapped to the challenger, sends the `after` traffic.
Prints every command and figure, and writes WORK/loop_demo.json. Uses its own run registry
(WORK/registry.sqlite), so it never touches the user's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import free_port  # noqa: E402

from tunesmith.evaluate.human import wilson  # noqa: E402

EXAMPLE = ROOT / "examples" / "drift"
NAME = "banking-drift"


def tunesmith(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run one tunesmith command, echoing it and its output; its exit code is returned, not raised
    unless `check` (retrain's 3 is an answer, not a failure)."""
    print(f"$ tunesmith {' '.join(args)}", flush=True)
    done = subprocess.run([sys.executable, "-m", "tunesmith", *args], env=env, text=True, capture_output=True)
    print(done.stdout + done.stderr, end="", flush=True)
    if check and done.returncode not in (0,):
        raise SystemExit(f"tunesmith {args[0]} exited {done.returncode}")
    return done


def champion(work: Path, given: Path | None, env: dict) -> Path:
    """The champion run: a copy of `given` (without its request log), or a fresh run of the example."""
    run = work / "champion"
    if given is not None:
        shutil.copytree(given, run, ignore=shutil.ignore_patterns("monitor"))
        return run
    started = time.perf_counter()
    tunesmith("run", str(EXAMPLE / "project.yaml"), "--out", str(run), "-q", env=env, check=False)
    print(f"champion trained and evaluated in {time.perf_counter() - started:.0f} s")
    return run


def serve(port: int, env: dict, log: Path) -> subprocess.Popen:
    """`tunesmith serve --registry NAME`, ready to answer."""
    print(f"$ tunesmith serve --registry {NAME} --port {port} &", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", "--registry", NAME, "--port", str(port)],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("the server did not become ready in 600 s")


def send(client: httpx.Client, rows: list[dict]) -> dict:
    """Classify each row, then give its true label as feedback; accuracy with its Wilson interval."""
    right, seen_new = 0, 0
    for row in rows:
        answer = client.post("/v1/classify", json={"text": row["text"]})
        answer.raise_for_status()
        body = answer.json()
        right += body["label"] == row["category"]
        fed = client.post("/v1/feedback", json={"request_id": body["request_id"], "label": row["category"]})
        fed.raise_for_status()
        seen_new += body["label"] not in KNOWN
    low, high = wilson(right, len(rows))
    return {"n": len(rows), "accuracy": round(right / len(rows), 4), "ci_low": low, "ci_high": high,
            "answers_with_a_new_intent": seen_new}


def served_run(port: int) -> str | None:
    """The run the server says it serves (tunesmith_served_run_info)."""
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith("tunesmith_served_run_info{") and line.endswith(" 1.0"):
            return line.split('run="', 1)[1].split('"', 1)[0]
    return None


def monitor(run: Path, env: dict) -> dict:
    done = tunesmith("monitor", str(run), env=env)
    as_json = subprocess.run([sys.executable, "-m", "tunesmith", "monitor", str(run), "--json"], env=env,
                             text=True, capture_output=True, check=True).stdout
    report = json.loads(as_json)
    return {"printed": done.stdout, "recommendation": report["recommendation"], "reason": report["reason"],
            "quality": report.get("quality")}


KNOWN: set[str] = set()


def traffic() -> dict[str, list[dict]]:
    phases: dict[str, list[dict]] = {}
    with open(EXAMPLE / "traffic.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            phases.setdefault(row["phase"], []).append(row)
    return phases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=None, help="Folder for the runs (default: a new one in /tmp).")
    ap.add_argument("--champion", type=Path, default=None, help="A finished run of examples/drift to start from.")
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args()
    work = args.work or Path(f"/tmp/tunesmith-loop-demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    work.mkdir(parents=True, exist_ok=False)
    env = {**os.environ, "TUNESMITH_REGISTRY": str(work / "registry.sqlite")}
    with open(ROOT / "examples" / "quickstart" / "data" / "train.csv", encoding="utf-8") as f:
        KNOWN.update(r["category"] for r in csv.DictReader(f))
    started, result = time.perf_counter(), {"work": str(work), "date": datetime.now(timezone.utc).isoformat()}
    run = champion(work, args.champion, env)
    tunesmith("promote", str(run), "--name", NAME, env=env)
    port = args.port or free_port()
    server = serve(port, env, work / "server.log")
    try:
        result.update(loop(run, work, port, env))
    finally:
        server.terminate()
        server.wait(60)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    (work / "loop_demo.json").write_text(json.dumps(result, indent=2))
    summary(result)


def loop(run: Path, work: Path, port: int, env: dict) -> dict:
    """Traffic, monitor, retrain, traffic again: the figures of each step."""
    phases, out = traffic(), {}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        for phase in ("normal", "shifted"):
            out[phase] = send(client, phases[phase])
            print(f"{phase} traffic: {out[phase]}", flush=True)
            out[f"monitor_after_{phase}"] = monitor(run, env)
        began = time.perf_counter()
        done = tunesmith("retrain", "--registry", NAME, "--out", str(work / "challenger"), "--quiet",
                         env=env, check=False)
        out["retrain"] = {"exit": done.returncode, "wall_s": round(time.perf_counter() - began, 1)}
        promotion = work / "challenger" / "promotion.json"
        if promotion.is_file():
            out["promotion"] = json.loads(promotion.read_text())
        if done.returncode == 0:
            deadline = time.monotonic() + 600
            while served_run(port) != str((work / "challenger").resolve()) and time.monotonic() < deadline:
                time.sleep(1)
            out["served_after_retrain"] = served_run(port)
            out["after"] = send(client, phases["after"])
            print(f"after traffic (served by the challenger): {out['after']}", flush=True)
    return out


def summary(result: dict) -> None:
    print("\n== summary ==")
    for phase in ("normal", "shifted", "after"):
        if phase in result:
            r = result[phase]
            print(f"live accuracy, {phase} traffic: {r['accuracy']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}] "
                  f"(n {r['n']})")
    promotion = result.get("promotion")
    if promotion:
        for split, c in promotion["comparisons"].items():
            if c:
                print(f"{split}: champion {c['champion']:.4f} -> challenger {c['challenger']:.4f}, diff "
                      f"{c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], {c['test']} p = "
                      f"{c['p_value']:.3g} (n {c['n']})")
        print(f"decision: {'PROMOTED' if promotion['decision']['promote'] else 'REJECTED'}; retrain exit "
              f"{result['retrain']['exit']}")
    print(f"wall {result['wall_s']:.0f} s; figures in {result['work']}/loop_demo.json")


if __name__ == "__main__":
    main()
