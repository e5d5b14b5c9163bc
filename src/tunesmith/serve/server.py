"""`tunesmith serve` and `tunesmith monitor`: the functions behind the two commands."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tunesmith.config import ServeConfig, load_config
from tunesmith.errors import EngineError, InputError, RunDirError


def serve_settings(target: Path) -> tuple[ServeConfig, Path | None]:
    """The serve section of a run's config (defaults for a bare model) and the request log path."""
    config = Path(target) / "config.yaml"
    if not config.is_file():
        return ServeConfig(), None
    cfg = load_config(config, check_files=False).serve
    return cfg, cfg.request_log.path or Path(target) / "monitor" / "requests.db"


def serve(target: Path, host: str = "127.0.0.1", port: int = 8000, variant: str | None = None,
          keys_file: Path | None = None, engine: str = "builtin", upstream: str | None = None) -> None:
    """Load the model (or reach the engine that has it) and serve it until interrupted."""
    from tunesmith.serve.service import load_service

    if keys_file is not None and not Path(keys_file).is_file():
        raise InputError(f"API key file not found: {keys_file}", "--api-keys-file")
    if engine == "vllm":
        return _sidecar(Path(target), host, port, keys_file, upstream)
    if upstream is not None:
        raise InputError("--upstream goes with --engine vllm", "--upstream")
    _run_app(load_service(target, variant), target, host, port, keys_file)


def _run_app(service, target: Path, host: str, port: int, keys_file: Path | None) -> None:
    import uvicorn

    from tunesmith.serve.app import create_app
    from tunesmith.serve.auth import load_keys

    cfg, log_path = serve_settings(target)
    keys = load_keys(keys_file)
    app = create_app(service, cfg, keys, log_path)
    where = "every interface" if host in ("0.0.0.0", "::") else host
    print(f"serving {service.name} ({service.variant}, loaded in {service.load_seconds:.1f} s) on http://{host}:{port}"
          f" ({where}; API keys {'required' if keys else 'not set: open to anyone who can reach it'})",
          file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)


def _sidecar(run_dir: Path, host: str, port: int, keys_file: Path | None, upstream: str | None) -> None:
    """vLLM's OpenAI-compatible server on a loopback port (started here unless `upstream` names a
    running one), with tunesmith in front: keys, limits, request log, metrics and drift."""
    from tunesmith.serve.remote import RemoteService, wait_ready

    if not (run_dir / "model" / "tunesmith.json").is_file():
        raise RunDirError("the vLLM engine serves a run directory", str(run_dir), "give a folder made by `tunesmith run`")
    name = load_config(run_dir / "config.yaml", check_files=False).name
    process = None
    if upstream is None:
        upstream, process = _start_vllm(run_dir, name)
    try:
        try:
            wait_ready(upstream, process=process, timeout=900 if process else 30)
        except EngineError as e:
            if process is None:  # the user's URL: their input is wrong
                raise InputError(e.what, "--upstream", "start the OpenAI-compatible server first") from None
            raise
        _run_app(RemoteService(name, run_dir, run_dir / "model", upstream), run_dir, host, port, keys_file)
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)


def _start_vllm(run_dir: Path, name: str):
    from tunesmith.serve.remote import vllm_command

    if shutil.which("vllm") is None:
        raise InputError("vLLM is not installed", "--engine vllm",
                         "pip install vllm on a machine with a supported GPU, pass --upstream URL of a running "
                         "one, or use the built-in server")
    model = vllm_model_dir(run_dir)
    port = free_port()
    print(f"starting vLLM on 127.0.0.1:{port}: {' '.join(vllm_command(model, port, name))}", file=sys.stderr)
    return f"http://127.0.0.1:{port}", subprocess.Popen(vllm_command(model, port, name))


def vllm_model_dir(run_dir: Path) -> Path:
    """Whole weights vLLM can load: the merged variant, or the run's model after full fine-tuning."""
    for model in (run_dir / "variants" / "merged", run_dir / "model"):
        if (model / "config.json").is_file() and any(model.glob("*.safetensors")) \
                and not (model / "adapter_config.json").is_file():
            return model
    raise RunDirError("vLLM needs whole weights: run `tunesmith optimize RUN_DIR --variants merged`", str(run_dir))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    from tunesmith.serve.alerts import write_monitoring

    project = load_config(Path(run_dir) / "config.yaml", check_files=False)
    bound = project.objective.constraints.get("latency_p95_ms")
    return write_monitoring(out_dir, project.name, bound.max if bound and bound.max else 1000.0, target)
