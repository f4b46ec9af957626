"""Routing of a mixture-of-experts model before and after unlearning: per layer, the share of the forget and of the
retain tokens the routers send to each expert, as UOE's paper shows it (unlearning the whole model moves the forget
tokens away from the experts that held them; UOE's anchor keeps them on its expert). A run on an MoE model writes
routing.json and routing.png to its folder; a dense model has no routing and gets neither.

    share[l, e]       = (tokens whose top-k at layer l holds e) / (tokens * k)          (sums to 1 over e)
    probability[l, e] = mean over the tokens of the router's softmax probability of e at layer l
    shift[l]          = 1/2 sum_e | share_after[l, e] - share_before[l, e] |            (total variation, 0 to 1)
    forget_routing_shift, retain_routing_shift = mean over the sparse blocks l of shift[l], per set (the run's
                        metrics.json and the bench's columns; declared in registry.METRICS)

Tokens are every real token (question and answer, or the text) of the first `limit` items of each set, encoded by the
run's adapter: a vision-language run's items keep their pictures, so the image tokens (the vision tower's features,
projected) are routed and counted with the text's. Both families' runners call `moe_routing` and `routing_files`."""
from __future__ import annotations

from pathlib import Path

SETS = ("forget", "retain")


def routing_shares(model, tokenizer, sets: dict[str, list], batch_size: int = 16, limit: int | None = 256,
                   adapter=None) -> dict | None:
    """{"layers": sparse block names, "top_k", "experts", "sets": {name: {"items", "tokens", "share", "probability"}}}
    of `model` on the items of each set (QA items or texts); None for a dense model."""
    from obliviate.models.moe import moe_layers, routing_counts

    if adapter is None:
        from obliviate.models import causal_lm as adapter
    layers = moe_layers(model)
    if not layers:
        return None
    pad, device = tokenizer.pad_token_id, adapter.model_device(model)
    out = {"layers": [layer.name for layer in layers], "top_k": [layer.top_k for layer in layers],
           "experts": max(layer.num_experts for layer in layers), "sets": {}}
    was_training = model.training
    model.eval()
    try:
        for name, items in sets.items():
            items = list(items)[:limit] if limit else list(items)
            encoded = [adapter.encode_item(tokenizer, item) for item in items]
            batches = (adapter.to_device(adapter.collate(encoded[i:i + batch_size], pad), device)
                       for i in range(0, len(encoded), batch_size))
            counts = routing_counts(model, batches, layers)
            tokens = max(float(counts["tokens"]), 1.0)
            k = [[layer.top_k] for layer in layers]
            share = counts["selected"] / (tokens * counts["selected"].new_tensor(k))
            out["sets"][name] = {"items": len(items), "tokens": int(counts["tokens"]),
                                 "share": _rounded(share), "probability": _rounded(counts["probability"] / tokens)}
    finally:
        model.train(was_training)
    return out


def moe_routing(model, tokenizer, forget: list, retain: list, batch_size: int, adapter=None):
    """For a mixture-of-experts model: its routing of the forget and retain items now, and a function that takes the
    unlearned model (and the method) and returns routing.json's record; None for a dense model."""
    sets = {"forget": forget, "retain": retain}
    before = routing_shares(model, tokenizer, sets, batch_size, adapter=adapter)
    if before is None:
        return None

    def after(unlearned, method) -> dict:
        return routing_record(before, routing_shares(unlearned, tokenizer, sets, batch_size, adapter=adapter),
                              method.chosen())
    return after


def _rounded(table) -> list[list[float]]:
    return [[round(float(x), 6) for x in row] for row in table]


def routing_shift(before: dict, after: dict) -> dict[str, list[float]]:
    """Per set, per layer: the total variation between the shares before and after."""
    return {name: [round(0.5 * sum(abs(a - b) for a, b in zip(row_a, row_b)), 6)
                   for row_a, row_b in zip(after["sets"][name]["share"], before["sets"][name]["share"])]
            for name in before["sets"] if name in after["sets"]}


def routing_metrics(record: dict) -> dict[str, float]:
    """The run's declared routing metrics from routing.json's record: per set, the mean shift over the sparse blocks."""
    return {f"{name}_routing_shift": round(sum(shift) / len(shift), 6)
            for name, shift in record["shift"].items() if name in SETS and shift}


def routing_record(before: dict, after: dict, unlearned: dict | None = None) -> dict:
    """routing.json: the shares before and after, their shift, and the expert a method unlearned (UOE), if any."""
    record = {"before": before, "after": after, "shift": routing_shift(before, after)}
    if unlearned is not None:
        record["unlearned_expert"] = unlearned
    return record


def write_routing(folder: Path, record: dict, title: str = "") -> list[str]:
    """routing.json and routing.png in `folder`; returns the report's note lines."""
    from obliviate.runs import write_json

    folder = Path(folder)
    write_json(folder / "routing.json", record)
    plot_routing(record, folder / "routing.png", title)
    notes = []
    for name, shift in record["shift"].items():
        notes.append(f"routing shift of the {name} tokens (total variation of the expert shares, per sparse block): "
                     + ", ".join(f"{s:.3f}" for s in shift))
    if "unlearned_expert" in record:
        u = record["unlearned_expert"]
        notes.append(f"unlearned expert: {u['expert']} of sparse block {u['layer']} ({u['name']})")
    return notes


def routing_files(folder: Path, record: dict, title: str = "") -> dict:
    """routing.json and routing.png in a run folder, and what the run's report shows of them (`grids`, `notes`)."""
    notes = write_routing(folder, record, title)
    return {"grids": {"routing: each expert's share of the tokens, before and after": "routing.png"}, "notes": notes}


def plot_routing(record: dict, path: Path, title: str = "") -> Path:
    """One panel per set and sparse block: each expert's share of the tokens before (light) and after (dark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = record["before"], record["after"]
    names = [n for n in SETS if n in before["sets"]] + [n for n in before["sets"] if n not in SETS]
    layers, experts = len(before["layers"]), before["experts"]
    size = (max(6.0, 1.2 + 0.45 * experts * layers), 0.6 + 1.9 * len(names))
    fig, axes = plt.subplots(len(names), layers, figsize=size, squeeze=False, sharey=True)
    unlearned = record.get("unlearned_expert")
    xs = list(range(experts))
    for row, name in enumerate(names):
        for col in range(layers):
            ax = axes[row][col]
            ax.bar([x - 0.2 for x in xs], before["sets"][name]["share"][col], 0.4, color="#9ecae1", label="before")
            ax.bar([x + 0.2 for x in xs], after["sets"][name]["share"][col], 0.4, color="#08519c", label="after")
            ax.axhline(1 / experts, color="grey", lw=0.6, ls=":")
            if unlearned is not None and unlearned["layer"] == col:
                ax.axvspan(unlearned["expert"] - 0.5, unlearned["expert"] + 0.5, color="#fdd0a2", zorder=0)
            ax.set_xticks(xs)
            ax.tick_params(labelsize=7)
            if row == 0:
                ax.set_title(f"block {col}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"{name} tokens\nshare", fontsize=8)
            if row == len(names) - 1:
                ax.set_xlabel("expert", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle((f"{title}: " if title else "") + "each expert's share of the tokens, before and after unlearning",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
