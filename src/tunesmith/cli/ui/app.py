"""The `tunesmith ui` application: settings, shared state, the FastAPI app and the server loop.

Every feature module (runs_pages, jobs, review, watch) exposes a `router`; `create_app` includes
them behind the same security layer (security.py): API keys when set, the loopback Host check,
CSRF tokens on state-changing routes, and every file read confined to `--root`.
"""

from __future__ import annotations

import secrets
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith import fsio
from tunesmith.errors import InputError, TunesmithError
from tunesmith.serve.replies import error, invalid_body

STATIC = Path(__file__).parent / "static"


@dataclass
class UiSettings:
    """What `tunesmith ui` was started with."""

    root: Path
    host: str = "127.0.0.1"
    port: int = 7860
    api_keys: list[str] | None = None
    max_jobs: int = 1


@dataclass
class UiState:
    """What every route reaches through `request.app.state.ui`."""

    settings: UiSettings
    root: Path                      # settings.root, resolved: the only folder files are read from
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    jobs: object | None = None      # jobs.JobManager


def settings_from_options(host: str, port: int, root: Path | None, keys_file: Path | None,
                          max_jobs: int) -> UiSettings:
    """UiSettings from the command's options, each checked (InputError naming the flag)."""
    from tunesmith.serve.auth import load_keys

    root = Path.cwd() if root is None else Path(root)
    if not root.is_dir():
        raise InputError(f"not a folder: {root}", "--root", "give the folder that holds your runs and data")
    if not 1 <= max_jobs <= 16:
        raise InputError(f"--max-jobs {max_jobs} is out of range", "--max-jobs", "give 1 to 16")
    return UiSettings(root=root, host=host, port=port, api_keys=load_keys(keys_file) or None, max_jobs=max_jobs)


def create_app(settings: UiSettings) -> FastAPI:
    """The workbench app for `settings` (not yet behind the loopback Host check: see serve_ui)."""
    from tunesmith.cli.ui import jobs, play, rate, review, runs_pages, security, watch

    root = Path(settings.root).resolve()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        for hook in getattr(app.state, "shutdown_hooks", ()):  # e.g. the playground's loaded models
            hook()
        manager = app.state.ui.jobs  # the server stops: so do the training jobs it started
        if manager is not None and hasattr(manager, "shutdown"):
            manager.shutdown()
    app = FastAPI(title="tunesmith ui", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.ui = UiState(settings=settings, root=root, jobs=jobs.JobManager(root, settings.max_jobs))
    _add_error_handlers(app)
    for module in (runs_pages, jobs, review, watch, play, rate):
        app.include_router(module.router)
    app.include_router(security.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    # outermost last: headers are set on every answer, the key check runs before any route
    app.add_middleware(security.KeyCheck, keys=settings.api_keys or [])
    app.add_middleware(security.SecurityHeaders)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Refusals in the OpenAI error format, as `tunesmith serve` answers them."""
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(TunesmithError)
    async def refused(request: Request, exc: TunesmithError):  # a damaged run a page reads, say
        bad_input = exc.exit_code == 2
        return error(400 if bad_input else 500, exc.line(), "invalid_request_error" if bad_input else "server_error")

    @app.exception_handler(fsio.DamagedFile)
    async def damaged(request: Request, exc: fsio.DamagedFile):
        return error(400, str(exc), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        message, param = invalid_body(exc.errors())
        return error(400, message, "invalid_request_error", param)


def check_open(host: str, keys: list[str]) -> None:
    """`tunesmith serve`'s rule: a server other machines can reach needs API keys (the workbench
    has no --insecure-no-auth: it starts training jobs and reads files under --root)."""
    from tunesmith.serve.hosts import is_loopback

    if keys or is_loopback(host):
        return
    raise InputError(f"no API keys are set and --host {host} is reachable from other machines", "--host",
                     "set TUNESMITH_API_KEYS or --api-keys-file, or bind 127.0.0.1")


def asgi_app(settings: UiSettings):
    """What the server runs: the app, behind the Host-header check on a loopback bind (a defence
    against DNS rebinding, as `tunesmith serve` has it) and a time limit on reading each request's body
    (security.BODY_SECONDS: a client trickling a body byte by byte, to /login before any key, would
    otherwise hold its connection for as long as it liked). Each route caps its body's size itself."""
    from tunesmith.cli.ui.review import MAX_BODY as LARGEST_BODY
    from tunesmith.cli.ui.security import BODY_SECONDS
    from tunesmith.serve.hosts import loopback_guard
    from tunesmith.serve.limits import BodyLimit

    timed = BodyLimit(create_app(settings), LARGEST_BODY, BODY_SECONDS, "the workbench's limit")
    return loopback_guard(timed, settings.host)


def serve_ui(settings: UiSettings) -> None:
    """Run the workbench until interrupted. Refused, as `tunesmith serve` refuses, on a host other
    machines can reach without API keys; the port is bound before anything else starts."""
    import uvicorn

    from tunesmith.serve.connections import head_deadline_protocol
    from tunesmith.serve.server import bind_listener

    keys = settings.api_keys or []
    check_open(settings.host, keys)
    listener = bind_listener(settings.host, settings.port)
    try:
        app = asgi_app(settings)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        access = "required" if keys else "not set: open to this machine only"
        print(f"tunesmith ui on http://{host}:{settings.port}/ (root {Path(settings.root).resolve()}; "
              f"API keys {access}); Ctrl-C stops it", file=sys.stderr)
        # Connections that send no request head are closed after 10 s (serve's default): idle sockets would
        # otherwise pile up until the process runs out of file descriptors.
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                                               http=head_deadline_protocol(10.0)))
        try:
            server.run(sockets=[listener.sock])
        except KeyboardInterrupt:  # Ctrl-C is how the workbench is meant to stop: not an error
            print("tunesmith ui stopped", file=sys.stderr)
    finally:
        listener.sock.close()
