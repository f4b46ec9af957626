"""One process of the sharded-training test (tests/test_sharding.py): unlearn a saved tiny model for a few steps with
train.shard = SHARD ("fsdp" under torchrun, "no" for the one-process reference) and, on the first process, save the
changed tensors and the losses. Clipping is on, so the gradient norm is taken over the shards too."""
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
torch.set_num_threads(1)


def main(model_dir: str, out: str, method: str, shard: str, batch_size: str = "4") -> None:
    from safetensors.torch import save_file

    from conftest import tiny_items, tiny_texts
    from obliviate import distributed, progress
    from obliviate.config import LMTrainConfig
    from obliviate.loops.lm import unlearn
    from obliviate.methods.common import make_method
    from obliviate.loops.step import changed_tensors
    from obliviate.models import causal_lm as lm

    progress.set_enabled(False)
    model, tok = lm.load(model_dir)
    items = tiny_items()
    # no forget-loss cap: the untrained model's NLL is above it, which would leave the surgery nothing to do
    args = {"diverse_retain_size": 4, "forget_loss_cap": None} if method == "RGD" else {}
    result = unlearn(model, tok, items[:4], items[4:] + tiny_texts()[:2], make_method("lm", method, args),
                     LMTrainConfig(max_steps=3, batch_size=int(batch_size), lr=1e-3, max_grad_norm=1.0, shard=shard))
    assert not any(type(p).__name__ == "DTensor" for p in result.model.parameters())  # gathered: an ordinary model
    if distributed.is_main():
        tensors = changed_tensors(result.model, result.trainable_names)
        save_file({k: v.float() for k, v in tensors.items()}, out,
                  metadata={"losses": ",".join(f"{h['loss']:.8f}" for h in result.history),
                            "cosines": ",".join(f"{h.get('grad_cosine', 0):.8f}" for h in result.history)})
    distributed.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
