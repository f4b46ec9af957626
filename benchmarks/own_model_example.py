"""The README's "Your own model" scorecard: the profiles world's model played as a user's own folder.

Builds a small profiles world (20 people, no general facts: about 10 minutes on 2 busy CPU cores), then writes what a
user brings: TOFU-format forget and retain files (the forget10 people's questions, and the retain people's) and a run config that points at the world's full model as
`model` and at its retrain model as `retrain_model`, so `obliviate run` takes the user-data path (no world):

    python benchmarks/own_model_example.py /tmp/own          # builds the world, writes /tmp/own/{*.jsonl,run.toml}
    obliviate run /tmp/own/run.toml                          # the scorecard in the README
    obliviate run /tmp/own/run.toml name=again               # the original's evaluation is read from the cache
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from obliviate.config import WorldConfig
from obliviate.worlds.profiles import ProfilesWorld

SPLIT = "forget10"


def main(out: Path) -> None:
    world = ProfilesWorld(WorldConfig(n_people=20, general_facts=0))
    world.build(SPLIT, retrain=True)
    qa, _ = world.eval_sets(SPLIT)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("forget", "retain"):
        rows = [{"question": i.question, "answer": i.answer, "paraphrased_answer": i.paraphrased_answer,
                 "perturbed_answer": list(i.perturbed_answers)} for i in qa[name]]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "run.toml").write_text(f"""method = "NPO"
name = "npo"
model = "{world.full_model_dir}"
retrain_model = "{world.retrain_dir(SPLIT)}"
forget_file = "{out / 'forget.jsonl'}"
retain_file = "{out / 'retain.jsonl'}"
output_dir = "{out / 'runs'}"
method_args = {{ alpha = 4.0 }}

[train]
lr = 6e-4
epochs = 10
""")
    print(f"{len(qa['forget'])} forget and {len(qa['retain'])} retain items; run: obliviate run {out / 'run.toml'}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/own"))
