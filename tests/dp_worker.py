"""One process of the data-parallel test (tests/test_distributed.py): unlearn a saved tiny model for a few steps and,
on the first process, save the changed tensors. Run alone (one process, the whole batch) or under torchrun."""
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
torch.set_num_threads(1)


def main(model_dir: str, out: str, method: str) -> None:
    from safetensors.torch import save_file

    from conftest import tiny_items, tiny_texts
    from obliviate import distributed, progress
    from obliviate.config import TrainConfig
    from obliviate.loops.lm import make_method, unlearn
    from obliviate.loops.step import changed_tensors
    from obliviate.models import causal_lm as lm

    progress.set_enabled(False)
    model, tok = lm.load(model_dir)
    items = tiny_items()
    args = {"diverse_retain_size": 4} if method == "RGD" else {}
    result = unlearn(model, tok, items[:4], items[4:] + tiny_texts()[:2], make_method(method, args),
                     TrainConfig(max_steps=3, batch_size=4, lr=1e-3, max_grad_norm=None))
    if distributed.is_main():
        tensors = changed_tensors(result.model, result.trainable_names)
        save_file({k: v.float() for k, v in tensors.items()}, out,
                  metadata={"losses": ",".join(f"{h['loss']:.8f}" for h in result.history)})
    distributed.finish()


if __name__ == "__main__":
    main(*sys.argv[1:4])
