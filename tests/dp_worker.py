"""One process of the data-parallel test (tests/test_distributed.py): unlearn a saved tiny model for a few steps and,
on the first process, save the changed tensors and the history. Run alone (one process, the whole batch) or under
torchrun.

    dp_worker.py MODEL_DIR OUT_DIR METHOD[,METHOD...] [BATCH_SIZE [GRAD_ACCUM_STEPS]]

Each method starts from the saved model and writes OUT_DIR/METHOD.safetensors; the methods share one launch, since
starting the processes costs more than their few steps.

4 forget and 4 retain items: with batch 4 two processes take 2 + 2; with batch 3 a pass is a batch of 3 (2 + 1)
then a tail of 1 (1 + 0: the second process has no item) on both sides."""
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
torch.set_num_threads(1)


def main(model_dir: str, out_dir: str, methods: str, batch_size: str = "4", accumulation: str = "1") -> None:
    from pathlib import Path

    from obliviate import distributed, progress

    progress.set_enabled(False)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for method in methods.split(","):
        unlearn_and_save(model_dir, f"{out_dir}/{method}.safetensors", method, int(batch_size), int(accumulation))
    distributed.finish()


def unlearn_and_save(model_dir: str, out: str, method: str, batch_size: int, accumulation: int) -> None:
    from safetensors.torch import save_file

    from conftest import tiny_items, tiny_texts
    from obliviate import distributed
    from obliviate.config import LMTrainConfig
    from obliviate.loops.lm import unlearn
    from obliviate.methods.common import make_method
    from obliviate.loops.step import changed_tensors
    from obliviate.models import causal_lm as lm
    from obliviate.models import sequences

    model, tok = lm.load(model_dir)
    items = tiny_items()
    forget = items[:4]
    args = {}
    if method == "RGD":  # a cap between the forget answers' NLLs: some sequences are dropped, some kept
        with torch.no_grad():
            nll = sequences.answer_nll(model, lm.collate([lm.encode_item(tok, i) for i in forget], tok.pad_token_id))
        nll = nll.sort().values
        args = {"diverse_retain_size": 3, "forget_loss_cap": float(nll[1] + nll[2]) / 2}
    if method == "AltPO":  # its alternate answers: a wrong answer of the same kind for each forget question
        import json

        alternates = f"{out}.alternates.jsonl"
        with open(alternates, "w") as f:
            f.writelines(json.dumps({"question": i.question, "alternate": i.perturbed_answers[0]}) + "\n"
                         for i in forget)
        args = {"alternates": alternates}
    result = unlearn(model, tok, forget, items[4:] + tiny_texts()[:2], make_method("lm", method, args),
                     LMTrainConfig(max_steps=3, batch_size=batch_size, grad_accum_steps=accumulation,
                                 lr=1e-3, max_grad_norm=None))
    if distributed.is_main():
        tensors = changed_tensors(result.model, result.trainable_names)
        logs = sorted({k for h in result.history for k in h if k != "step"})
        save_file({k: v.float() for k, v in tensors.items()}, out,
                  metadata={key: ",".join(f"{h[key]:.8f}" for h in result.history) for key in logs})


if __name__ == "__main__":
    main(*sys.argv[1:])
