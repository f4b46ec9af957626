"""Training curves to TensorBoard or Weights & Biases, besides the run folder's history.json (`train.report_to`, as
HF Trainer's `report_to`: "none", "tensorboard", "wandb", or a list). `obliviate run` opens a session around the
run (`session`); the loops hand each step's logs to `log`, which is a no-op outside a session. The writers open at
the first step, on the first process only: TensorBoard event files go to OUTPUT_DIR/tensorboard/<run>
(`tensorboard --logdir OUTPUT_DIR/tensorboard`), a wandb run to the project WANDB_PROJECT (default "obliviate")."""
from __future__ import annotations

import contextlib
import os
from datetime import datetime, timezone
from pathlib import Path


EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # target -> (module, extra)

_active: "_Session | None" = None


def targets(report_to) -> list[str]:
    if report_to in (None, "none"):
        return []
    return [report_to] if isinstance(report_to, str) else [t for t in report_to if t != "none"]


def check(config) -> None:
    """One line when a package that `train.report_to` names is not installed (before any work)."""
    from obliviate.families import require_extra

    for target in targets(config.train.report_to):
        require_extra(EXTRAS[target][1], EXTRAS[target][0])


class _Session:
    def __init__(self, config, log):
        self.config, self.log_line = config, log
        self.name = config.name or f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{config.method}"
        self.writers: list | None = None  # opened at the first step

    def _open(self) -> list:
        from obliviate import distributed

        if not distributed.is_main():  # the other processes' curves are the same steps
            return []
        writers = []
        for target in targets(self.config.train.report_to):
            if target == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                folder = Path(self.config.output_dir) / "tensorboard" / self.name
                writers.append(_TensorBoard(SummaryWriter(log_dir=str(folder))))
                self.log_line(f"TensorBoard: {folder} (tensorboard --logdir {folder.parent})")
            else:
                import wandb

                run = wandb.init(project=os.environ.get("WANDB_PROJECT", "obliviate"), name=self.name,
                                 config=self.config.dump(), reinit=True)
                writers.append(_WandB(run))
        return writers

    def write(self, logs: dict) -> None:
        if self.writers is None:
            self.writers = self._open()
        step = int(logs.get("step", 0))
        scalars = {k: float(v) for k, v in logs.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for writer in self.writers:
            writer.write(scalars, step)

    def close(self) -> None:
        for writer in self.writers or []:
            writer.close()


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def write(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run):
        self.run = run

    def write(self, scalars: dict, step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


@contextlib.contextmanager
def session(config, log=print):
    """Around one run: the loops' `log` calls go to the writers that `config.train.report_to` names."""
    global _active
    if not targets(config.train.report_to):
        yield
        return
    check(config)
    previous, _active = _active, _Session(config, log)
    try:
        yield
    finally:
        current, _active = _active, previous
        current.close()


def log(logs: dict) -> None:
    """One step's logs (the dict history.json keeps) to the open session's writers; nothing without a session."""
    if _active is not None:
        _active.write(logs)
