"""Experiment trackers: TensorBoard (local event files), MLflow (local file store), W&B (offline).

Each tracker takes the same flat records the run's own train_log.jsonl holds; numbers become
scalars keyed by step. A tracker whose package is missing is a clear error before training starts.
"""

from __future__ import annotations

from pathlib import Path

from tunesmith.errors import ConfigError

_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


class Trackers:
    """Fan records out to the configured trackers, writing under `out_dir`."""

    def __init__(self, names: list[str], out_dir: Path | None, run_name: str, config: dict):
        self.writers = [_open(name, out_dir, run_name, config) for name in names] if out_dir else []

    def log(self, record: dict) -> None:
        scalars = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        for writer in self.writers:
            writer.log(scalars, int(record["step"]))

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_available(names: list[str]) -> None:
    """Raise ConfigError naming train.trackers when a tracker's package is not installed."""
    import importlib.util

    for name in names:
        package = _PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"tracker '{name}' needs the '{package}' package", "train.trackers",
                              f"pip install {package}, or remove '{name}' from train.trackers")


def _open(name: str, out_dir: Path, run_name: str, config: dict):
    return {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}[name](out_dir, run_name, config)


class _TensorBoard:
    def __init__(self, out_dir: Path, run_name: str, config: dict):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(out_dir / "tensorboard"))

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, out_dir: Path, run_name: str, config: dict):
        import os

        import mlflow

        # A plain folder store needs no database; MLflow 3 keeps it behind this opt-in.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri((out_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(run_name)
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, scalars: dict, step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Wandb:
    def __init__(self, out_dir: Path, run_name: str, config: dict):
        import wandb

        # Offline: files only, synced later with `wandb sync` where the network allows.
        self.run = wandb.init(project=run_name, dir=str(out_dir), mode="offline", config=config,
                              settings=wandb.Settings(silent=True))

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
