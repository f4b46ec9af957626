"""Adapters: each model family talks to its models through one module here (causal_lm, diffusion, vlm); the helpers
here serve them all."""
from __future__ import annotations

from pathlib import Path


def check_model_folder(folder: str | Path) -> Path:
    """A transformers model folder: it exists and holds a config.json that is a JSON object."""
    from obliviate.data import read_json_file
    from obliviate.errors import ObliviateError

    folder = Path(folder)
    if not folder.is_dir():
        raise ObliviateError(f"model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise ObliviateError(f"not a transformers model folder (no config.json): {folder}")
    if not isinstance(read_json_file(folder / "config.json", "model config"), dict):
        raise ObliviateError(f"{folder / 'config.json'}: must be a JSON object")
    return folder


def quiet_transformers() -> None:
    """No per-file progress bars or advisory warnings from transformers: obliviate shows its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def weights_load_errors() -> tuple[type[BaseException], ...]:
    """What a corrupt or truncated weights file raises from from_pretrained (transformers loads .bin files with
    torch.load(weights_only=True)): caught by the loaders and turned into one line naming the folder."""
    import pickle

    from safetensors import SafetensorError

    # pickle.UnpicklingError: garbage, or objects weights_only refuses; EOFError: an empty .bin; RuntimeError:
    # torch's zip reader on a damaged .bin; SafetensorError: a truncated or garbled .safetensors header.
    return OSError, ValueError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError


def weights_error_message(folder: Path, e: BaseException) -> str:
    """One line saying which weights file failed; for a failed unpickle our own words, since torch's message
    suggests weights_only=False, which obliviate never does."""
    import pickle

    from safetensors import SafetensorError

    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    bins = ", ".join(sorted(p.name for p in folder.glob("*pytorch_model*.bin")))
    safetensors = ", ".join(sorted(p.name for p in folder.glob("*model*.safetensors")))
    if isinstance(e, SafetensorError):
        return f"{safetensors or 'a .safetensors file'} is corrupt or truncated ({text})"
    if isinstance(e, (pickle.UnpicklingError, EOFError)):
        return (f"{bins or 'a .bin weights file'} is corrupt or truncated, or holds more than tensors "
                "(checkpoints are loaded with torch.load(weights_only=True))")
    # torch's zip reader (RuntimeError) and mmap (a bare errno OSError) do not say which file; the .bin is read
    # only when there are no safetensors
    if bins and not safetensors and (isinstance(e, RuntimeError) or isinstance(e, OSError) and e.errno):
        return f"{bins} cannot be loaded: {text.split('. ')[0]}"
    return text
