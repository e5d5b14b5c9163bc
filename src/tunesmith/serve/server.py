"""`tunesmith serve` and `tunesmith monitor`: the functions behind the two commands."""

from __future__ import annotations

import errno
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from tunesmith.config import ServeConfig, derive, load_config
from tunesmith.errors import EngineError, InputError, RunDirError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a run's name, as config.yaml allows it


def serve_settings(target: Path) -> tuple[ServeConfig, Path | None]:
    """The serve section of a run's config (defaults for a bare model) and the request log path."""
    config = Path(target) / "config.yaml"
    if not config.is_file():
        return ServeConfig(), None
    cfg = load_config(config, check_files=False).serve
    return cfg, cfg.request_log.path or Path(target) / "monitor" / "requests.db"


@dataclass
class Listener:
    """The server's socket, bound and listening before the model loads: a taken port fails at once,
    and no other process can take it during the load (connections made meanwhile wait in the
    backlog and are answered once the server runs)."""

    host: str
    port: int
    sock: socket.socket


def serve(target: Path | None, host: str = "127.0.0.1", port: int = 8000, variant: str | None = None,
          keys_file: Path | None = None, engine: str = "builtin", upstream: str | None = None,
          insecure_no_auth: bool = False, upstream_key_env: str | None = None, registry: str | None = None,
          lora: bool = False, upstream_model: str | None = None) -> None:
    """Load the model (or reach the engine that has it) and serve it until interrupted.

    Every input is checked before anything slow starts: keys (`keys_file`, TUNESMITH_API_KEYS),
    an open server only on loopback unless `insecure_no_auth`, the port, the upstream's key.
    With `registry` in place of `target`, the run promoted under that name is served, and the server
    follows the champion registry: a run promoted (or rolled back to) later is swapped in without
    dropping a request (see serve/swap.py). With `engine` "vllm", `lora` makes the vLLM started here load
    the run's LoRA adapter on its base even where whole weights exist (see `vllm_model`), and
    `upstream_model` is the name requested from an `upstream` serving several models.
    """
    from tunesmith.serve.auth import load_keys
    from tunesmith.serve.service import load_service

    _check_target(target, registry, engine)
    if engine != "vllm":
        for value, flag in ((upstream, "--upstream"), (upstream_key_env, "--upstream-api-key-env"),
                            (upstream_model, "--upstream-model"), (lora or None, "--lora")):
            if value is not None:
                raise InputError(f"{flag} goes with --engine vllm", flag)
    if registry is not None:
        target = champion_run(registry)
    keys = load_keys(keys_file)
    check_open(host, keys, insecure_no_auth)
    if engine == "vllm":
        run_dir = Path(target)
        upstream_key, plan = _sidecar_checks(run_dir, upstream, upstream_key_env, lora, upstream_model)
    listener = bind_listener(host, port)
    previous = _exit_on_sigterm()  # SIGTERM is how a server is stopped (systemd, docker): exit 0, not an error
    try:
        if engine == "vllm":
            return _sidecar(run_dir, listener, keys, upstream, upstream_key, plan, upstream_model)
        _run_app(load_service(target, variant), target, listener, keys, registry, variant)
    finally:
        listener.sock.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _check_target(target: Path | None, registry: str | None, engine: str) -> None:
    """Exactly one of TARGET and --registry; the registry is followed by the built-in engine only."""
    if target is not None and registry is not None:
        raise InputError("TARGET and --registry exclude each other", "--registry",
                         "give a run directory or model to serve it, or --registry NAME to follow the promoted run")
    if target is None and registry is None:
        raise InputError("nothing to serve", "TARGET", "give a run directory, a model name, or --registry NAME")
    if registry is not None and engine != "builtin":
        raise InputError("--registry goes with the built-in engine (an upstream engine cannot swap models)",
                         "--registry", "drop --engine, or serve the run directory with --engine vllm")


def champion_run(name: str) -> Path:
    """The run promoted under `name` (what `serve --registry NAME` starts with).

    Raises:
        InputError: nothing is promoted under `name` (or a bad name). RunDirError: its folder is gone.
    """
    from tunesmith.champions import check_name, current
    from tunesmith.runs import is_run_dir

    check_name(name, "--registry")
    run = current(name)
    if run is None:
        raise InputError(f"nothing is promoted under '{name}'", "--registry",
                         f"promote a run first: `tunesmith promote RUN_DIR --name {name}`")
    if not is_run_dir(run):
        raise RunDirError(f"the run promoted as '{name}' is gone (no model/tunesmith.json)", str(run),
                          f"promote a run that exists (`tunesmith promote RUN_DIR --name {name}`) "
                          f"or roll back (`tunesmith rollback {name}`)")
    return run


def check_open(host: str, keys: list[str], insecure_no_auth: bool = False) -> None:
    """Refuse a server without keys that other machines can reach, unless the user insists."""
    from tunesmith.serve.hosts import is_loopback

    if keys or insecure_no_auth or is_loopback(host):
        return
    raise InputError(f"no API keys are set and --host {host} is reachable from other machines", "--host",
                     "set TUNESMITH_API_KEYS or --api-keys-file, bind 127.0.0.1, "
                     "or pass --insecure-no-auth to serve without keys")


def bind_listener(host: str, port: int) -> Listener:
    """A listening socket on host:port; InputError naming the flag at fault."""
    if not 1 <= port <= 65535:
        raise InputError(f"port {port} is out of range", "--port", "give a port from 1 to 65535")
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InputError(f"cannot resolve the address '{host}'", "--host",
                         "give an address such as 127.0.0.1 or 0.0.0.0") from None
    # IPv4 first where a name has both (localhost): the address users and probes try first
    family, kind, proto, _, address = min(found, key=lambda f: f[0] != socket.AF_INET)
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is not "in use"
    try:
        sock.bind(address)
        sock.listen(2048)  # listening at once: two bound, not-listening SO_REUSEADDR sockets may share a port
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} is already in use on {host}", "--port",
                             "stop the process that holds it or choose another port") from None
        if e.errno == errno.EACCES:
            raise InputError(f"no permission to bind port {port}", "--port", "choose a port above 1023") from None
        raise InputError(f"cannot bind {host}:{port} ({e.strerror})", "--host",
                         "give an address of this machine, e.g. 127.0.0.1") from None
    return Listener(host, port, sock)


def _run_app(service, target: Path, listener: Listener, keys: list[str], registry: str | None = None,
             variant: str | None = None) -> None:
    import uvicorn

    from tunesmith.serve.connections import Capacity, head_deadline_protocol

    cfg, log_path = serve_settings(target)
    host, port = listener.host, listener.port
    served = build_app(service, cfg, keys, log_path, registry, variant)
    where = "every interface" if host in ("0.0.0.0", "::") else host
    following = f", following the registry '{registry}': {service.run_dir}" if registry else ""
    access = "required" if keys else "not set: open to anyone who can reach it"
    print(f"serving {service.name} ({service.variant}, loaded in {service.load_seconds:.1f} s{following}) on "
          f"http://{host}:{port} ({where}; API keys {access})", file=sys.stderr)
    # Past serve.max_concurrency connections or requests the guard answers 503 with Retry-After (JSON, as the
    # app's own 503s: its queue full, or a request past serve.request_timeout_s). A connection must send
    # each request head within serve.body_timeout_s (see connections.py).
    capacity = Capacity(cfg.max_concurrency)
    app = guarded(served.app, host, capacity)
    # proxy_headers off: X-Forwarded-For from a local client would rewrite the client address the
    # capacity count keys refused connections by (and nothing here needs a forwarded address).
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            proxy_headers=False, http=head_deadline_protocol(cfg.body_timeout_s, capacity))
    server = uvicorn.Server(config)
    if served.follower is not None:
        served.follower.start()
    try:
        server.run(sockets=[listener.sock])
    finally:  # the app's shutdown stopped it already; this covers an app that never started
        if served.follower is not None:
            served.follower.stop()
    if not server.started:  # the app failed to start (uvicorn logged why)
        raise EngineError("the server did not start")


def guarded(app, host: str, capacity):
    """`app` behind the checks in front of it (a Host/Origin check on a loopback bind, the connection
    capacity), whose refusals are counted in tunesmith_requests_total as the app counts its own answers
    (and a capacity 503 also in tunesmith_rejected_total, reason connections)."""
    from tunesmith.serve.connections import CapacityGuard
    from tunesmith.serve.hosts import loopback_guard

    metrics, routes = app.state.metrics, app.state.routes
    rejected = metrics.rejected.labels("connections")

    def count(scope: dict, status: int) -> None:
        path = scope.get("path", "")
        metrics.requests.labels(path if path in routes else "other", str(status)).inc()
    return CapacityGuard(loopback_guard(app, host, count), capacity, lambda scope: (rejected.inc(), count(scope, 503)))


@dataclass
class ServedApp:
    """What `build_app` makes: the ASGI app, and with a registry the slot it serves from and the
    follower that swaps models into it (started and stopped by whoever runs the app)."""

    app: object
    slot: object | None = None       # swap.ServiceSlot
    follower: object | None = None   # swap.RegistryFollower


def build_app(service, cfg: ServeConfig, keys: list[str], log_path: Path | None, registry: str | None = None,
              variant: str | None = None, poll_s: float | None = None, load=None) -> ServedApp:
    """The app serving `service` (see create_app). With `registry`, the app serves through a
    ServiceSlot, and a RegistryFollower (not started yet) polls that registry name every `poll_s`
    seconds and swaps in the run promoted there, loaded by `load(run_dir, variant)` (load_service).
    The request log stays `log_path` (the first run's) for the server's lifetime, so feedback on an
    answer of either model finds its request."""
    from tunesmith.serve.app import create_app

    if registry is None:
        return ServedApp(create_app(service, cfg, keys, log_path))
    from tunesmith.serve.service import load_service
    from tunesmith.serve.state import check_budget
    from tunesmith.serve.swap import POLL_S, RegistryFollower, ServiceSlot

    slot = ServiceSlot(service)
    app = create_app(slot, cfg, keys, log_path)
    follower = RegistryFollower(registry, slot, app.state.metrics, load or load_service,
                                fits=lambda new: check_budget(new, cfg), variant=variant,
                                poll_s=POLL_S if poll_s is None else poll_s, on_swap=_monitors_follow(app.state))
    app.state.before_close.append(follower.stop)  # the app's shutdown stops it before closing the model
    return ServedApp(app, slot, follower)


def _monitors_follow(app_state):
    """After a swap, live quality is measured for the new run (its metric and accepted figure) and
    drift against its training data."""
    def follow(run_dir: Path) -> None:
        if getattr(app_state, "quality", None) is not None:
            app_state.quality.follow(run_dir)
        if getattr(app_state, "watch", None) is not None:
            app_state.watch.run_dir = Path(run_dir)
    return follow


def _sidecar_checks(run_dir: Path, upstream: str | None, upstream_key_env: str | None, lora: bool = False,
                    upstream_model: str | None = None) -> tuple[str | None, VllmModel | None]:
    """What `--engine vllm` needs, checked before the port is bound: a run directory, and either
    vLLM and weights it can load, or a running upstream (and its key). Returns the upstream's key, and
    what a vLLM started here loads (None with `upstream`)."""
    if not (run_dir / "model" / "tunesmith.json").is_file():
        raise RunDirError("the vLLM engine serves a run directory", str(run_dir),
                          "give a folder made by `tunesmith run`")
    if upstream is not None:
        if lora:
            raise InputError("--lora chooses what a vLLM started here loads; a running --upstream has its own "
                             "models", "--lora", "name the upstream's LoRA module with --upstream-model NAME")
        return upstream_api_key(upstream_key_env), None
    for value, flag, why in ((upstream_key_env, "--upstream-api-key-env", "a vLLM started here gets a fresh key"),
                             (upstream_model, "--upstream-model", "a vLLM started here serves the run by its name")):
        if value is not None:
            raise InputError(f"{flag} goes with --upstream ({why})", flag)
    if shutil.which("vllm") is None:
        raise InputError("vLLM is not installed", "--engine vllm",
                         "pip install vllm on a machine with a supported GPU, pass --upstream URL of a running "
                         "one, or use the built-in server")
    return None, vllm_model(run_dir, lora)


def upstream_api_key(env_name: str | None, environ: dict | None = None) -> str | None:
    """The upstream's API key from the environment variable the user named (never from argv,
    which other users of the machine can read)."""
    if env_name is None:
        return None
    value = (os.environ if environ is None else environ).get(env_name, "").strip()
    if not value:
        raise InputError(f"the environment variable {env_name} is not set or empty", "--upstream-api-key-env",
                         f"export {env_name}=KEY, the key the upstream server expects")
    return value


def _sidecar(run_dir: Path, listener: Listener, keys: list[str], upstream: str | None,
             upstream_key: str | None, plan: VllmModel | None = None, upstream_model: str | None = None) -> None:
    """vLLM's OpenAI-compatible server on a loopback port (started here unless `upstream` names a
    running one), with tunesmith in front: keys, limits, request log, metrics and drift. A vLLM
    started here is stopped whenever this function leaves, SIGTERM included. The sidecar requests
    `upstream_model` (default: the run's name), and refuses to start unless the upstream lists it."""
    from tunesmith.serve.remote import ModelNotListed, RemoteService, stop_engine

    name = run_name(run_dir)
    process, previous = None, _exit_on_sigterm()
    try:
        if upstream is None:
            upstream, upstream_key, process = _start_vllm(plan or vllm_model(run_dir))
        _wait_upstream(upstream, upstream_key, process)
        try:
            remote = RemoteService(name, run_dir, run_dir / "model", upstream, api_key=upstream_key,
                                   model=upstream_model or name)
        except ModelNotListed as e:
            if process is not None:
                raise
            raise InputError(e.what, "--upstream-model", "pass the name it serves this run's model under "
                             "(for vLLM, the name of its --lora-modules entry for RUN_DIR/model)") from None
        _run_app(remote, run_dir, listener, keys)
    finally:
        if process is not None:
            stop_engine(process)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """SIGTERM -> SystemExit, so `finally` blocks run and the engine is stopped. Without it a
    SIGTERM kills the process outright: before uvicorn starts, and after it, since uvicorn
    re-raises the signal it caught once it has shut down. Returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None  # only the main thread may set handlers (and receives signals)

    def stop(signum, frame):
        raise SystemExit(0)
    return signal.signal(signal.SIGTERM, stop)


def _wait_upstream(upstream: str, key: str | None, process) -> None:
    from tunesmith.serve.remote import wait_ready

    try:
        wait_ready(upstream, process=process, timeout=900 if process else 30, api_key=key)
    except EngineError as e:
        if process is None:  # the user's URL: their input is wrong
            raise InputError(e.what, "--upstream", "start the OpenAI-compatible server first") from None
        raise


def _start_vllm(plan: VllmModel):
    """(url, key, process): vLLM on a free loopback port, requiring a fresh random key that only
    this process knows (passed in vLLM's environment, not its argv, which `ps` shows everyone)."""
    from tunesmith.serve.remote import start_engine, vllm_command, vllm_lora_command

    port, key = free_port(), secrets.token_urlsafe(32)
    if plan.adapter is None:
        command = vllm_command(plan.model, port, plan.name)
    else:
        command = vllm_lora_command(plan.model, port, {plan.name: plan.adapter}, plan.rank)
    print(f"starting vLLM on 127.0.0.1:{port} (API key required): {shlex.join(command)}", file=sys.stderr)
    return f"http://127.0.0.1:{port}", key, start_engine(command, key)


def run_name(run_dir: Path) -> str:
    """The run's project name: what its server calls its model, and its LoRA module's default name."""
    return load_config(Path(run_dir) / "config.yaml", check_files=False).name


def vllm_model_dir(run_dir: Path) -> Path:
    """Whole weights vLLM can load: the merged variant, or the run's model after full fine-tuning."""
    for model in (run_dir / "variants" / "merged", run_dir / "model"):
        if (model / "config.json").is_file() and any(model.glob("*.safetensors")) \
                and not (model / "adapter_config.json").is_file():
            return model
    raise RunDirError("vLLM needs whole weights: run `tunesmith optimize RUN_DIR --variants merged`", str(run_dir))


@dataclass(frozen=True)
class VllmModel:
    """What vLLM loads for one run: whole weights (`adapter` None), or the base checkpoint `model` with
    the run's LoRA adapter, requested under `name` (the sidecar's `model` field)."""

    name: str
    model: Path
    adapter: Path | None = None
    rank: int = 0


def vllm_model(run_dir: Path, lora: bool = False, name: str | None = None, shared: bool = False) -> VllmModel:
    """Whole weights where the run has them (the merged variant, or a full fine-tune: no LoRA kernels,
    the fastest vLLM runs them), else, or with `lora` or `shared`, the run's LoRA adapter on its base,
    so that the fine-tunes of one base can share one vLLM server. `lora`: `serve --lora` asked for the
    adapter; `shared`: `serve --print-vllm-command` did (the errors' hints name the command's options).

    Raises:
        RunDirError: no whole weights and no adapter vLLM can serve (naming what it cannot).
    """
    run_dir, name = Path(run_dir), name or run_name(run_dir)
    lora = lora or shared
    if not lora:
        try:
            return VllmModel(name, vllm_model_dir(run_dir))
        except RunDirError:
            if not (run_dir / "model" / "adapter_config.json").is_file():
                raise
    from tunesmith.serve.remote import MERGED, lora_adapter_rank
    from tunesmith.train.finetuned import read_meta

    adapter = (run_dir / "model").resolve()
    meta = read_meta(adapter)
    alone = "serve it on its own vLLM (`tunesmith serve RUN_DIR --engine vllm`), not in --print-vllm-command"
    if meta.get("kind") != "adapter" or not (adapter / "adapter_config.json").is_file():
        whole = f"{alone}: it loads the run's whole weights" if shared else "drop --lora: vLLM serves its whole weights"
        raise RunDirError(f"a {meta.get('method')} run has no LoRA adapter to serve", str(adapter / "tunesmith.json"),
                          whole)
    # How to serve whole weights instead, in the terms of the command given.
    merged = f"{MERGED}, then {alone}" if shared else MERGED + (" (and drop --lora)" if lora else "")
    rank = lora_adapter_rank(adapter, merged)
    return VllmModel(name, lora_base(adapter, meta, merged), adapter, rank)


def lora_base(model_dir: Path, meta: dict, hint: str) -> Path:
    """The checkpoint folder the run's adapter was trained on, as the built-in engine finds it (the
    folder recorded in tunesmith.json, else its model name resolved again: the default model's GGUF
    is converted into tunesmith's cache once), checked to be one vLLM loads (`hint` if it is not)."""
    from tunesmith.train.finetuned import run_base_path

    base = run_base_path(model_dir, meta)
    if not (base / "config.json").is_file() or not any(base.glob("*.safetensors")):
        raise RunDirError(f"the base model {base} is not a checkpoint folder vLLM loads (config.json and "
                          "safetensors weights)", str(model_dir / "tunesmith.json"), hint)
    return base.resolve()


@dataclass(frozen=True)
class SharedVllm:
    """One vLLM command serving several runs' adapters on their common base, and one sidecar command
    per run (each fronting its own adapter by name)."""

    command: list[str]
    sidecars: list[str]


def shared_vllm_command(targets: list[str], host: str = "127.0.0.1", port: int = 8000) -> SharedVllm:
    """The `vllm serve BASE --enable-lora --lora-modules ...` command for several runs (`RUN_DIR` or
    `NAME=RUN_DIR`; NAME defaults to the run's name) and their sidecars.

    Raises:
        InputError: no runs, the runs do not share one base checkpoint, or two share a name.
        RunDirError: a run vLLM cannot serve as a LoRA adapter.
    """
    from tunesmith.serve.remote import vllm_lora_command

    if not targets:
        raise InputError("no runs to serve", "RUN_DIR", "give the run directories whose adapters share a base")
    plans = [(run, vllm_model(run, name=name, shared=True)) for run, name in map(_named_run, targets)]
    bases = {plan.model for _, plan in plans}
    if len(bases) > 1:
        each = "; ".join(f"{run}: {plan.model}" for run, plan in plans)
        raise InputError(f"the runs do not share one base model ({each})", "RUN_DIR",
                         "one vLLM server serves the adapters of one base: print one command per base")
    names = [plan.name for _, plan in plans]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"two runs are named {', '.join(twice)}", "RUN_DIR", "name them: NAME=RUN_DIR")
    command = vllm_lora_command(bases.pop(), port, {p.name: p.adapter for _, p in plans},
                                max(p.rank for _, p in plans), host)
    url = f"http://{_client_host(host)}:{port}"
    sidecars = [shlex.join(["tunesmith", "serve", str(run), "--engine", "vllm", "--upstream", url,
                            "--upstream-api-key-env", "VLLM_API_KEY", "--upstream-model", plan.name,
                            "--port", str(port + 1 + i)]) for i, (run, plan) in enumerate(plans)]
    return SharedVllm(command, sidecars)


def print_shared_vllm_command(targets: list, host: str = "127.0.0.1", port: int = 8000,
                              options: dict | None = None) -> int:
    """`serve --print-vllm-command RUN...`: the shared vLLM command on stdout (one line, for scripts);
    how to set its key and the sidecar commands on stderr. Returns the exit code.

    `options`: the other `serve` options as given (flag: value; None or False where not given). It
    prints a command for --host and --port only, so any other is refused rather than silently ignored.

    Raises:
        InputError: an option that does not go with --print-vllm-command (named), or what
            `shared_vllm_command` refuses.
    """
    from tunesmith.serve.hosts import is_loopback

    for flag, value in (options or {}).items():
        if value not in (None, False):
            raise InputError(f"{flag} does not go with --print-vllm-command", flag,
                             "it takes run directories (or NAME=RUN_DIR), --host and --port only")
    shared = shared_vllm_command([str(t) for t in targets], host, port)
    if not is_loopback(host):  # the user asked for it; say what the key does not cover
        print(f"# note: --host {host} exposes vLLM beyond this machine; its key guards the /v1 routes only",
              file=sys.stderr)
    print("# the key stays out of argv: vLLM reads it from VLLM_API_KEY, the sidecars from --upstream-api-key-env\n"
          "export VLLM_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')", file=sys.stderr)
    print(shlex.join(shared.command))
    print("# then one sidecar per run (add TUNESMITH_API_KEYS or --api-keys-file for its clients):\n"
          + "\n".join(shared.sidecars), file=sys.stderr)
    return 0


def one_target(targets: list | None) -> Path | None:
    """The one TARGET `serve` takes (several go with --print-vllm-command)."""
    if targets and len(targets) > 1:
        raise InputError(f"serve takes one TARGET, not {len(targets)}", "TARGET",
                         "serve each run on its own port; --print-vllm-command takes several")
    return Path(targets[0]) if targets else None


def _named_run(target: str) -> tuple[Path, str | None]:
    """(run directory, the name given with NAME=RUN_DIR or None); checked to be a run."""
    target = str(target)
    name, sep, rest = target.partition("=")
    named = sep and not Path(target).exists()
    run = Path(rest if named else target)
    if named and not NAME.fullmatch(name):
        raise InputError(f"bad adapter name '{name}' (letters, digits, '.', '_', '-')", target)
    if not (run / "model" / "tunesmith.json").is_file():
        raise RunDirError("not a trained run directory (no model/tunesmith.json)", str(run),
                          "give folders made by `tunesmith run`")
    return run, name if named else None


def _client_host(host: str) -> str:
    """The address a sidecar on this machine reaches a server bound to `host` at."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def monitor(run_dir: Path, db: Path | None = None, window: int | None = None,
            since_hours: float | None = None) -> dict:
    """The drift report of a served run's request log against its training reference, with the
    live quality on feedback-labelled traffic per window (`quality`, windows reaching back
    `since_hours` when given); a quality drop makes the recommendation "retrain"."""
    from tunesmith.serve.drift import drift_report, reference
    from tunesmith.serve.quality import with_live_quality
    from tunesmith.serve.store import recent

    run_dir = Path(run_dir)
    if not (run_dir / "model" / "tunesmith.json").is_file():
        raise RunDirError("not a trained run directory", str(run_dir), "give a folder made by `tunesmith run`")
    cfg, default_db = serve_settings(run_dir)
    db = Path(db) if db else default_db
    if db is None or not db.is_file():
        raise RunDirError(f"no request log at {db}", str(run_dir),
                          "serve the run first (`tunesmith serve RUN_DIR`); a run swapped in by `serve --registry` "
                          "is logged in the first run's log: give it with --db")
    try:
        settings = derive(cfg.drift, {"window": window}) if window is not None else cfg.drift
    except ValidationError as e:
        raise InputError(f"bad window {window}: {e.errors()[0]['msg']}", "--window",
                         "compare 10 to 1,000,000 recent requests") from None
    if since_hours is not None and not (math.isfinite(since_hours) and since_hours > 0):
        raise InputError(f"bad --since {since_hours}: give a finite number of hours above 0", "--since")
    rows = recent(db, settings.window, run_dir.resolve())
    report = drift_report(reference(run_dir, settings.clusters), rows, settings, run_dir)
    return with_live_quality(report, run_dir, db, since_hours)


def write_alerts(run_dir: Path, out_dir: Path, target: str = "127.0.0.1:8000") -> list[Path]:
    """Alert rules (p95 threshold from the objective's latency constraint, the quality drop from the
    run's monitor section), their tests, dashboard, prometheus.yml."""
    from tunesmith.serve.alerts import write_monitoring

    project = load_config(Path(run_dir) / "config.yaml", check_files=False)
    bound = project.objective.constraints.get("latency_p95_ms")
    return write_monitoring(out_dir, project.name, bound.max if bound and bound.max else 1000.0, target,
                            project.monitor.max_quality_drop, project.monitor.min_labelled)
