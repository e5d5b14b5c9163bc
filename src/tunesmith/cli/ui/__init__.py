"""`tunesmith ui`: a local web workbench (runs, new run, watch, label review) served by FastAPI.

Only `register` lives here, so that `tunesmith --help` does not import FastAPI: the app is built
by `tunesmith.cli.ui.app` when the command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer

from tunesmith.cli.common import DEBUG, guarded


def register(app: typer.Typer) -> None:
    """Add the `ui` command to the CLI `app`."""

    @app.command("ui")
    def ui(host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
           port: int = typer.Option(7860, "--port", help="Port to listen on."),
           root: Path = typer.Option(None, "--root", help="Folder whose runs and data the workbench shows (default: "
                                                          "the current folder); nothing outside it is readable."),
           api_keys_file: Path = typer.Option(None, "--api-keys-file",
                                              help="File with API keys, one a line (also TUNESMITH_API_KEYS); "
                                                   "required for a host other than loopback."),
           max_jobs: int = typer.Option(1, "--max-jobs", help="Runs the workbench may train at once."),
           debug: bool = DEBUG) -> None:
        """Open the web workbench: browse and compare runs, start and watch one, try it, rate, review labels."""
        def go() -> int:
            from tunesmith.cli.ui.app import serve_ui, settings_from_options

            serve_ui(settings_from_options(host, port, root, api_keys_file, max_jobs))
            return 0
        guarded(debug, go)
