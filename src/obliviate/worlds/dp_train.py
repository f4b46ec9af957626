"""DP-SGD training of a causal LM through Opacus: stage 1 of DP2Unlearning (worlds/profiles_dp2.py).

Opacus's PrivacyEngine does the privacy work, nothing here imitates it: Poisson sampling of the examples (its
DPDataLoader), per-sample gradients (hooks for Linear and Embedding, functorch for the Llama RMSNorm it has no
sampler for; tied input/output embeddings get the sum of both uses), clipping of each example's whole gradient to
`max_grad_norm`, Gaussian noise of std `noise_multiplier * max_grad_norm`, and the accountant that states ε. The
unit of privacy is one training sequence (a question-answer pair, a biography): each example's loss is the mean NLL
of its own answer tokens, so its gradient depends on it alone (a batch-wide token mean would make each example's
gradient depend on the others' lengths, and the clipping would no longer bound one example's influence).

Not cryptographically secure: Opacus's `secure_mode` (a CSPRNG for the noise and the sampling) is off, as in the
DP2Unlearning reference code; the noise and the sampling come from torch's seeded generator, so a build repeats."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from obliviate.errors import ObliviateError

ACCOUNTANTS = ("prv", "rdp")


@dataclass
class DPRecipe:
    """`world.dp2` of a profiles world: DP2Unlearning's settings. Give `epsilon` (the noise multiplier that reaches it
    after `epochs` is found by Opacus) or `noise_multiplier` (ε is then what the accountant says), not both. None
    for epochs, lr and batch_size: the world recipe's (LMRecipe); `finetune_epochs` None: half the recipe's epochs
    (the fine-tunes start from a model that already has the format, the paper's "about half the cost")."""
    epsilon: float | None = 8.0  # target ε of stage 1 (per training sequence)
    delta: float = 1e-5  # must be below 1 / (number of training sequences)
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0  # per-sample clipping bound C (the reference's Train_dp_SGD.yaml: 1.0)
    accountant: str = "prv"  # Opacus's default, which the reference uses; or "rdp"
    epochs: int | None = None  # stage 1's passes over the data (expected: Poisson sampling)
    lr: float | None = None
    batch_size: int | None = None  # expected batch size: sample rate = batch_size / number of sequences
    finetune_epochs: int | None = None  # stage 2 (all data) and a deletion's fine-tune (the retain data)


def dp_recipe(settings: dict | None) -> DPRecipe:
    """The DPRecipe of `world.dp2` (a dict), its values checked: one line naming the key."""
    known = {f for f in DPRecipe.__dataclass_fields__}
    bad = sorted(set(settings or {}) - known)
    if bad:
        raise ObliviateError(f"world.dp2: unknown key(s) {bad}; valid: {sorted(known)}")
    dp = DPRecipe(**(settings or {}))
    if "epsilon" in (settings or {}) and dp.noise_multiplier is not None and dp.epsilon is not None:
        raise ObliviateError("world.dp2: give epsilon or noise_multiplier, not both")
    if dp.noise_multiplier is not None:
        dp.epsilon = None
    if dp.epsilon is None and dp.noise_multiplier is None:
        raise ObliviateError("world.dp2: give epsilon (the target) or noise_multiplier")

    def positive(key, value, whole=False):
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or not value > 0 \
                or (whole and value != int(value)):
            kind = "a whole number > 0" if whole else "a number > 0"
            raise ObliviateError(f"world.dp2.{key} must be {kind}, got {value!r}")

    for key in ("epsilon", "noise_multiplier", "max_grad_norm", "lr", "delta"):
        positive(key, getattr(dp, key))
    for key in ("epochs", "batch_size", "finetune_epochs"):
        positive(key, getattr(dp, key), whole=True)
        if getattr(dp, key) is not None:
            setattr(dp, key, int(getattr(dp, key)))  # 2.0 from a file is 2 (and one cache key)
    if not dp.delta < 1:
        raise ObliviateError(f"world.dp2.delta must be in (0, 1), got {dp.delta!r}")
    if dp.accountant not in ACCOUNTANTS:
        raise ObliviateError(f"world.dp2.accountant: {dp.accountant!r}; valid: {', '.join(ACCOUNTANTS)}")
    return dp


def check_delta(dp: DPRecipe, n_examples: int) -> None:
    """δ must be below 1/N: at δ >= 1/N a mechanism that publishes one random example outright is (0, δ)-DP."""
    if not dp.delta < 1 / n_examples:
        raise ObliviateError(f"world.dp2.delta = {dp.delta:g} must be below 1/N = {1 / n_examples:.3g} "
                             f"(N = {n_examples} training sequences)")


def require_opacus() -> None:
    from obliviate.families import require_extra

    require_extra("dp", "opacus")


def accountant_epsilon(accountant: str, noise_multiplier: float, sample_rate: float, steps: int,
                       delta: float) -> float:
    """ε of `steps` steps of the sampled Gaussian mechanism, straight from Opacus's accountant."""
    require_opacus()
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


def train_dp(model, tokenizer, examples: list, recipe, dp: DPRecipe, description: str = "DP-SGD") -> dict:
    """Train `model` in place with DP-SGD on `examples` (models/sequences.Encoded); `recipe` is the world's LMRecipe
    with epochs, lr and batch size already resolved from `dp`. AdamW with the world recipe's warm-up and cosine decay
    (post-processing of the noisy gradients: no privacy cost). Returns the stats and the privacy the accountant
    states: epsilon at `dp.delta`, the noise multiplier, the sample rate and the steps."""
    require_opacus()
    import warnings

    import torch
    from opacus import PrivacyEngine

    from obliviate import progress
    from obliviate.models import sequences as seq

    check_delta(dp, len(examples))
    torch.manual_seed(recipe.seed)  # the model's dropout, Poisson sampling and the noise: one seeded stream
    pad = tokenizer.pad_token_id
    # the dataset is the examples' indices: Opacus reads a sample's shape from dataset[0]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.arange(len(examples))), batch_size=recipe.batch_size,
        collate_fn=lambda rows: seq.collate([examples[int(i)] for (i,) in rows], pad))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    model.train()  # Opacus's validator requires it
    common = dict(module=model, optimizer=opt, data_loader=loader, max_grad_norm=dp.max_grad_norm,
                  poisson_sampling=True, loss_reduction="mean", wrap_model=False)  # hooks on the HF model itself
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")  # secure_mode is off, as said above
        engine = PrivacyEngine(accountant=dp.accountant)
        if dp.epsilon is not None:
            hooks, opt, loader = engine.make_private_with_epsilon(
                target_epsilon=dp.epsilon, target_delta=dp.delta, epochs=recipe.epochs, **common)
        else:
            hooks, opt, loader = engine.make_private(noise_multiplier=dp.noise_multiplier, **common)
    steps_per_epoch = len(loader)  # Opacus's Poisson loader: 1 / sample_rate batches per epoch
    total = steps_per_epoch * recipe.epochs
    warmup = max(1, int(total * recipe.warmup_fraction))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt.original_optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    params = [p for p in model.parameters() if p.requires_grad]
    t0 = time.time()
    loss_value = float("nan")
    empty = 0
    try:
        with progress.bar(description, total) as advance, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")  # the inputs are token ids
            for _ in range(recipe.epochs):
                for batch in loader:
                    opt.zero_grad(set_to_none=True)
                    if batch["input_ids"].shape[0] == 0:
                        # a Poisson draw of no example: Opacus's empty-batch step (no gradient, only the noise);
                        # the model cannot run on zero rows, so its per-sample gradients are given as zero rows
                        empty += 1
                        for p in params:
                            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    else:
                        loss = seq.answer_nll(model, batch).mean()  # a mean of per-example means ("mean")
                        loss.backward()
                        loss_value = loss.item()
                    opt.step()
                    sched.step()
                    advance(loss=loss_value)
    finally:
        hooks.cleanup()
        for p in params:  # Opacus's per-step buffers, so the model is an ordinary one again
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
    model.eval()
    noise = opt.noise_multiplier
    return {"steps": total, "final_loss": loss_value, "seconds": round(time.time() - t0, 1),
            "epsilon": float(engine.get_epsilon(delta=dp.delta)), "delta": dp.delta,
            "noise_multiplier": noise, "max_grad_norm": dp.max_grad_norm, "accountant": dp.accountant,
            "sample_rate": loader.sample_rate, "expected_batch_size": round(loader.sample_rate * len(examples), 2),
            "examples": len(examples), "empty_batches": empty, "unit": "one training sequence"}
