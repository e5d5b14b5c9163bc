"""`tunesmith serve` and `tunesmith monitor`: the functions behind the two commands."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tunesmith.config import ServeConfig
from tunesmith.errors import InputError, RunDirError


def serve_settings(target: Path) -> tuple[ServeConfig, Path | None]:
    """The serve section of a run's config (defaults for a bare model) and the request log path."""
    config = Path(target) / "config.yaml"
    if not config.is_file():
        return ServeConfig(), None
    from tunesmith.config import load_config

    cfg = load_config(config, check_files=False).serve
    return cfg, cfg.request_log.path or Path(target) / "monitor" / "requests.db"


def serve(target: Path, host: str = "127.0.0.1", port: int = 8000, variant: str | None = None,
          keys_file: Path | None = None, engine: str = "builtin") -> None:
    """Load the model and serve it until interrupted."""
    if engine == "vllm":
        return _vllm(Path(target), host, port)
    import uvicorn

    from tunesmith.serve.app import create_app
    from tunesmith.serve.auth import load_keys
    from tunesmith.serve.service import load_service

    if keys_file is not None and not Path(keys_file).is_file():
        raise InputError(f"API key file not found: {keys_file}", "--api-keys-file")
    cfg, log_path = serve_settings(target)
    service = load_service(target, variant)
    keys = load_keys(keys_file)
    app = create_app(service, cfg, keys, log_path)
    where = "every interface" if host in ("0.0.0.0", "::") else host
    print(f"serving {service.name} ({service.variant}, loaded in {service.load_seconds:.1f} s) on http://{host}:{port}"
          f" ({where}; API keys {'required' if keys else 'not set: open to anyone who can reach it'})",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


def _vllm(run_dir: Path, host: str, port: int) -> None:
    """Hand the merged model to vLLM's OpenAI-compatible server (for traffic beyond one process)."""
    if shutil.which("vllm") is None:
        raise InputError("vLLM is not installed", "--engine vllm",
                         "pip install vllm on a machine with a supported GPU, or use the built-in server")
    merged = run_dir / "variants" / "merged"
    model = merged if merged.is_dir() else run_dir / "model"
    if not (model / "config.json").is_file():
        raise RunDirError("vLLM needs whole weights: run `tunesmith optimize RUN_DIR --variants merged`", str(run_dir))
    subprocess.run(["vllm", "serve", str(model), "--host", host, "--port", str(port)], check=True)


def monitor(run_dir: Path, db: Path | None = None, window: int | None = None) -> dict:
    """The drift report of a served run's request log against its training reference."""
    from tunesmith.serve.drift import drift_report, reference
    from tunesmith.serve.store import recent

    run_dir = Path(run_dir)
    if not (run_dir / "model" / "tunesmith.json").is_file():
        raise RunDirError("not a trained run directory", str(run_dir), "give a folder made by `tunesmith run`")
    cfg, default_db = serve_settings(run_dir)
    db = Path(db) if db else default_db
    if db is None or not db.is_file():
        raise RunDirError(f"no request log at {db}", str(run_dir), "serve the run first (`tunesmith serve RUN_DIR`)")
    settings = cfg.drift.model_copy(update={"window": window}) if window else cfg.drift
    return drift_report(reference(run_dir, settings.clusters), recent(db, settings.window), settings, run_dir)


def write_alerts(run_dir: Path, out_dir: Path, target: str = "127.0.0.1:8000") -> list[Path]:
    """Alert rules (p95 threshold from the objective's latency constraint), their tests, dashboard, prometheus.yml."""
    from tunesmith.config import load_config
    from tunesmith.serve.alerts import write_monitoring

    project = load_config(Path(run_dir) / "config.yaml", check_files=False)
    bound = project.objective.constraints.get("latency_p95_ms")
    return write_monitoring(out_dir, project.name, bound.max if bound and bound.max else 1000.0, target)
