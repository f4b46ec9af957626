"""Recovery attacks on unlearned vision-language models: relearning (`relearn.py`) and in-context recall
(`in_context.py`). Each file holds one attack with its Config and its paper; both score the forget set with
MLLMU-Bench's protocol (`evals/mllmu.py`, through `common.py`) and read the run's items through `common.Target`. The
runner (runners/mllm_attack.py) attacks the unlearned model, the original and the retrain reference."""
