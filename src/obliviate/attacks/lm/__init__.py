"""Recovery attacks on unlearned language models (issue 10, section 1): relearning, in-context, rewording, probing
and quantization. Each file holds one attack (or a family of small ones) with its Config and its paper; all of them
talk to a model only through the causal-LM adapter and `common.py`, and read the run's items through `Target`."""
