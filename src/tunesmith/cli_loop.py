"""Commands of the production loop: feedback on live answers, retraining a challenger, promotion
and rollback. Each is a thin function over the stage code; `register` adds them to the app."""

from __future__ import annotations

import typer

# --- feedback -------------------------------------------------------------------------------------
feedback_app = typer.Typer(no_args_is_help=True, help="Verdicts on served answers: import labels that arrive offline.")

# --- retrain --------------------------------------------------------------------------------------

# --- promote / rollback ---------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add the loop's commands to `app`."""
    app.add_typer(feedback_app, name="feedback")
