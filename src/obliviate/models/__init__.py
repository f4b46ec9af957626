"""Adapters: each model family talks to its models through one module here (causal_lm, diffusion)."""


def quiet_transformers() -> None:
    """No per-file progress bars or advisory warnings from transformers: obliviate shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
