"""What a language-model unlearning method is: a config dataclass with the paper's defaults and a `losses` function.

The unlearning loop (obliviate.loops.lm) owns the optimiser and the steps; a method only says what to minimise.
Batches are dicts from `obliviate.models.causal_lm.collate`: input_ids, attention_mask, labels (-100 on prompt and
padding, so every loss counts answer tokens only). A forget batch also carries `forget["idk"]`: the same questions
with a refusal ("I don't know") as the answer, for preference methods.

Every loss is a mean over the optimiser step's global batch, never over a process's share or a micro-batch: a term
divides its share's sum by the step's count (`token_mean` for tokens, `item_mean` for sequences; models/sequences.py),
so data parallel with any split and gradient accumulation take the steps one process with the whole batch takes.
A batch may hold rows that are not items (`item_mask` 0: the padding row of an empty share, or rows RGD dropped);
they score no token, and per-sequence terms go through `item_mean`, which leaves them out. The logs are such means
too, so the loop can sum them over micro-batches and average them over processes.
"""
from __future__ import annotations

import torch

from obliviate.methods.common import LossParts, check_choice, check_number  # noqa: F401  (re-exported)
from obliviate.models.sequences import item_mean, items, token_mean  # noqa: F401  (re-exported)


class Method:
    """Base with the defaults; subclasses set `name`, `Config`, `needs_reference` and implement `losses`."""
    name: str = ""
    Config: type = object
    needs_reference: bool = False  # True only for methods that read the frozen original model
    wraps_base: bool = False  # True for a rule over another method (RG, WAGLE): never itself another rule's base

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()

    def setup(self, model, reference) -> None:
        """Called once before the first step (RMU draws its random direction here)."""

    def trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        """Which parameters the method updates (all by default; RMU picks a few MLP layers). Asked again after `fit`:
        a method may narrow its choice there on the data (UOE's expert), and its gradient mask, if any, is then per
        parameter still chosen."""
        return True

    def retain_pool(self, items: list, rng) -> list:
        """The retain items the loop samples batches from (RGD picks a diversified subset)."""
        return items

    full_retain_batch: bool = False  # True: every step uses the whole retain pool as one batch (RGD)

    def companions(self, forget: list, retain: list, rng) -> list | None:
        """An item paired with each forget item, collated as forget["companion"] (SafeEraser's decoupled prompt);
        None: no companions."""
        return None

    needs_world: bool = False  # True: the method takes material only a built-in world gives (AltPO's "world")

    def from_world(self, world) -> dict | None:
        """Called by the runner once the run's data are known, with its built-in world (None: the user's own data),
        before training: a method may take material from the world (AltPO's alternates = "world"). Returns what the
        run's metrics.json keeps of its material, or None (nothing: the default)."""
        return None

    def fit(self, model, named: list, forget_batches, retain_batches) -> None:
        """Called once before the first step with the trainable (name, parameter) pairs and lazy iterators over the
        whole forget and retain sets in batches (MMUnlearner's and WAGLE's masks); nothing by default."""

    def gradient_mask(self) -> list | None:
        """A 0/1 tensor per trainable parameter (in `fit`'s order) that every step's gradient is multiplied by, the
        entries outside it kept exactly, weight decay included (`step.gradient_step`; WAGLE's mask), or None: no
        mask. The loop asks once, after `fit`."""
        return None

    def select_forget(self, model, forget: dict) -> dict:
        """The forget micro-batch the step keeps, before the step's counts are taken (RGD drops rows); all of it."""
        return forget

    def chosen(self) -> dict | None:
        """What the method chose from the data in `fit`, for the run's record (UOE: the expert it unlearned and the
        affinity table); None by default."""
        return None

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        raise NotImplementedError

    def after_step(self, logs: dict, epoch: float) -> None:
        """Called after each optimiser step with the step's logs (global means over the step's batch: every
        micro-batch, every process) and the epochs of forget data gone through when the step began; the method may
        update its own state and add to the logs (PDU's dual variable). On resume the loop calls it again for the
        steps already taken, in order, so such state follows from the logs alone. Nothing by default."""

    # optional: f(g_forget: list[Tensor], g_retain: list[Tensor]) -> (list[Tensor], dict[str, float] of logs)
    combine_gradients = None


class RuleOverBase(Method):
    """A rule over another method (RG/RGD, WAGLE): its config names the base (`base`, `base_args`); the base gives
    the losses, the reference, the trained parameters, the retain pool, the companions and its own hooks, which this
    class hands on, and the rule adds its own step (RG's gradient combination, WAGLE's mask)."""
    wraps_base = True

    def __init__(self, config=None):
        super().__init__(config)
        self.base: Method = build_base(self.name, self.config.base, self.config.base_args)

    @property
    def needs_reference(self) -> bool:  # type: ignore[override]
        return self.base.needs_reference

    @property
    def full_retain_batch(self) -> bool:  # type: ignore[override]
        return self.base.full_retain_batch

    def setup(self, model, reference) -> None:
        self.base.setup(model, reference)

    def trainable(self, name: str, param: torch.nn.Parameter) -> bool:
        return self.base.trainable(name, param)

    def retain_pool(self, items: list, rng) -> list:
        return self.base.retain_pool(items, rng)

    def companions(self, forget: list, retain: list, rng) -> list | None:
        return self.base.companions(forget, retain, rng)  # AltPO's alternates

    @property
    def needs_world(self) -> bool:  # type: ignore[override]
        return self.base.needs_world

    def from_world(self, world) -> dict | None:
        return self.base.from_world(world)

    def select_forget(self, model, forget: dict) -> dict:
        return self.base.select_forget(model, forget)

    def after_step(self, logs: dict, epoch: float) -> None:
        self.base.after_step(logs, epoch)  # PDU's dual update

    def losses(self, model, reference, forget: dict, retain: dict) -> LossParts:
        return self.base.losses(model, reference, forget, retain)


# ---- small helpers shared by the language-model methods -------------------------------------------------------------

def resolve_base(method: str, name):
    """The registry entry of the base method a rule (RG, WAGLE) wraps: any language-model method that is not itself
    a rule; otherwise one line naming the valid bases."""
    from obliviate.errors import ObliviateError
    from obliviate.registry import LM_METHODS, lookup

    def is_base(entry) -> bool:
        cls = entry.load()
        return hasattr(cls, "losses") and not getattr(cls, "wraps_base", False)

    if not isinstance(name, str):
        raise ObliviateError(f"{method}: base must be a method name, got {name!r}")
    entry = lookup(LM_METHODS, name, "method")
    if not is_base(entry):
        valid = ", ".join(n for n, e in LM_METHODS.items() if is_base(e))
        raise ObliviateError(f"{method}: base={name!r} is not valid; choose one of {valid}")
    return entry


def build_base(method: str, name: str, base_args) -> Method:
    """The base method `name` built from its defaults plus `base_args` (unknown keys: one line naming the valid)."""
    from dataclasses import fields

    from obliviate.errors import ObliviateError

    cls = resolve_base(method, name).load()
    valid = [f.name for f in fields(cls.Config)]
    unknown = [k for k in base_args if k not in valid]
    if unknown:
        raise ObliviateError(f"{method}: base_args has unknown key(s) {', '.join(map(repr, unknown))} for "
                             f"{cls.name}; valid: {', '.join(valid) or '(none)'}")
    return cls(cls.Config(**base_args))


def nll_gradients(model, params: list, batches, limit: int | None = None):
    """For each of up to `limit` batches (all when None), the gradients of its mean answer NLL with respect to
    `params` (None where the loss does not reach a parameter): the data-dependent masks (MMUnlearner, WAGLE)."""
    from obliviate.models.sequences import mean_nll

    for n, batch in enumerate(batches):
        if n == limit:
            break
        yield torch.autograd.grad(mean_nll(model, batch), params, allow_unused=True)


def answer_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From logits already computed: the sum of answer-token log-probs per sequence ([B]) and the answer-token count."""
    from obliviate.models.sequences import token_logprobs
    lp, mask = token_logprobs(logits, labels)
    return lp.sum(-1), mask.sum(-1)


def nll_from_logits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (as `sequences.mean_nll`, from logits already computed)."""
    total, _ = answer_logprob(logits, batch["labels"])
    return token_mean(-total.sum(), batch)


@torch.no_grad()
def reference_logits(reference, batch: dict) -> torch.Tensor:
    """Logits of the frozen reference model (no graph)."""
    from obliviate.models.sequences import forward_logits
    return forward_logits(reference, batch)


def kl_on_answer_tokens(logits: torch.Tensor, ref_logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """KL(p_ref || p_theta) of the next-token distributions, averaged over the positions that predict an answer token
    (prompt and padding excluded); summed over the vocabulary."""
    from obliviate.models.sequences import shifted
    logits, _, mask = shifted(logits, batch["labels"])
    ref_logits = ref_logits[:, :-1, :]
    logp = torch.log_softmax(logits.float(), dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)  # [B, T-1]
    return token_mean((kl * mask).sum(), batch)


def retain_nll_term(model, retain: dict, alpha: float, logs: dict):
    """alpha * NLL on the retain answers (None when alpha is 0, so no retain pass runs); logs retain_nll."""
    if alpha == 0:
        return None
    from obliviate.models.sequences import mean_nll
    nll_r = mean_nll(model, retain)
    logs["retain_nll"] = float(nll_r.detach())
    return alpha * nll_r


def retain_kl_term(model, reference, retain: dict, alpha: float, logs: dict):
    """alpha * KL(p_ref || p_theta) on the retain answer tokens (None when alpha is 0); logs retain_kl, retain_nll."""
    if alpha == 0:
        return None
    from obliviate.models.sequences import forward_logits
    logits_r = forward_logits(model, retain)
    kl = kl_on_answer_tokens(logits_r, reference_logits(reference, retain), retain)
    logs["retain_kl"] = float(kl.detach())
    logs["retain_nll"] = float(nll_from_logits(logits_r.detach(), retain))
    return alpha * kl
