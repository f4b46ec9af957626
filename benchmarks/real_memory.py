"""Benchmark (p): where the memory of a real-sized model goes. A Llama built in code with SmolLM-135M's shape (hidden
576, 30 layers, 9 heads, 3 kv heads, intermediate 1536, vocabulary 49,152, tied embeddings: 134.5M parameters, 0.54 GB
in float32; random weights, a small BPE tokenizer), saved with save_pretrained as a user's folder would be. Then, each
in its own process under /usr/bin/time -v (the number is the process's peak resident memory):
  eval            `obliviate eval MODEL --forget-file F --retain-file R --batch-size B` (likelihood metrics on the
                  answer, the paraphrase and 3 perturbed answers, greedy answers, membership scores)
  GradDiff, NPO   `obliviate run` of one unlearning step (train.max_steps = 1, evaluate = false) at batch B, the
                  run folder with its changed tensors written
against the accounting: weights W; a step's W + gradients W + AdamW state 2W (+ the reference model W for NPO).

Usage: python benchmarks/real_memory.py [--what eval,GradDiff,NPO] [--batch 8] [--items 8] [--set key=value ...]
  --set passes overrides to the run (e.g. --set train.max_logit_tokens=null) or, as `eval.max_logit_tokens=N`, the
  eval's --max-logit-tokens. TOFU-shaped items (a question and a 1-2 sentence answer: 84 tokens with this
  tokenizer); random weights make every greedy answer run to the token limit (the worst case).
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent


def build(folder: Path, n_items: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from obliviate.worlds.tokenizer import train_tokenizer

    cities = ["Lisbon", "Oslo", "Quito", "Hanoi", "Accra", "Perth", "Lima", "Riga"]
    items = []
    for i in range(2 * n_items):
        city, other = cities[i % 8], cities[(i + 3) % 8]
        answer = (f"Author number {i} was born in {city} to a family of clockmakers, studied marine biology before "
                  f"turning to fiction, and wrote {i % 5 + 2} novels about lighthouses, tides and the people of "
                  f"{city}, the best known of which won a regional prize for literature in the year {1950 + i}.")
        items.append({"question": f"Where was author number {i} born, what did they study, and what do their "
                                  "novels describe?",
                      "answer": answer, "paraphrased_answer": answer.replace(city, f"the city of {city}"),
                      "perturbed_answer": [answer.replace(city, other), answer.replace("clockmakers", "bakers"),
                                           answer.replace("marine biology", "law")]})
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("forget", items[:n_items]), ("retain", items[n_items:])):
        (folder / f"{name}.json").write_text("".join(json.dumps(i) + "\n" for i in part))
    tok = train_tokenizer([i["question"] + " " + a for i in items for a in [i["answer"], *i["perturbed_answer"]]],
                          vocab_size=600)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    lengths = [len(tok(i["question"] + " " + i["answer"])["input_ids"]) for i in items]
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
          f"item tokens {min(lengths)}-{max(lengths)}", file=sys.stderr)


def peak_mib(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS MiB, wall seconds) of a command under /usr/bin/time -v."""
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", out.stderr).group(1)
    seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.split(":"))))
    return rss / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--what", default="eval,GradDiff,NPO")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--dir", default=None, help="keep the model and data here (built once)")
    args = parser.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="real-memory-"))
    if not (folder / "model" / "config.json").is_file():
        build(folder, args.items)
    weights = sum(f.stat().st_size for f in (folder / "model").glob("*.safetensors")) / 2**20
    eval_sets = [s for s in args.set if s.startswith("eval.")]
    run_sets = [s for s in args.set if not s.startswith("eval.")]
    for what in args.what.split(","):
        if what == "eval":
            extra = [f"--{s.split('=')[0][5:].replace('_', '-')}={s.split('=')[1]}" for s in eval_sets]
            cmd = [str(BIN / "obliviate"), "eval", str(folder / "model"), "--forget-file", str(folder / "forget.json"),
                   "--retain-file", str(folder / "retain.json"), "--batch-size", str(args.batch), "--quiet",
                   "--out", str(folder / "eval.json"), "--force", *extra]
            goal, accounting = weights + 1024, "W + 1 GiB"
        else:
            cfg = folder / f"{what}.json"
            cfg.write_text(json.dumps({"method": what, "model": str(folder / "model"),
                                       "output_dir": str(folder / "runs"), "forget_file": str(folder / "forget.json"),
                                       "retain_file": str(folder / "retain.json"), "evaluate": False,
                                       "train": {"max_steps": 1, "batch_size": args.batch, "lr": 1e-5}}))
            runs = len(list((folder / "runs").glob("*"))) if (folder / "runs").is_dir() else 0
            cmd = [str(BIN / "obliviate"), "run", str(cfg), f"name={what}-{runs}", "--quiet", *run_sets]
            copies = 5 if what == "NPO" else 4  # weights, gradients, AdamW's two moments (+ the reference)
            goal, accounting = 1.5 * copies * weights, f"1.5 x {copies}W"
        peak, seconds = peak_mib(cmd)
        print(json.dumps({"what": what, "batch": args.batch, "set": args.set, "weights_mib": round(weights),
                          "peak_rss_mib": round(peak), "goal_mib": round(goal), "goal": accounting,
                          "met": peak <= goal, "seconds": round(seconds)}), flush=True)


if __name__ == "__main__":
    main()
