"""`obliviate run`: hand a config to its family's runner (obliviate.families)."""
from __future__ import annotations

from pathlib import Path


def run(config, log=print, resume: bool = False) -> Path:
    """Unlearn, evaluate and write one run folder for `config` (a RunConfig); `resume` continues an interrupted run
    from its last checkpoint (`train.checkpoint_every`)."""
    from obliviate import tracking
    from obliviate.families import get

    with tracking.session(config, log):  # train.report_to: the loops' curves to TensorBoard / wandb
        return get(config.family).load("runner")(config, log, resume=resume)
