"""Moved to attacks/t2i/unlearn_diff_atk.py. This name stays only for the AdvUnlearn method, which imports the soft
prefix helpers from here; remove it once methods/t2i/adv_unlearn.py imports from the new place."""
from obliviate.attacks.t2i.unlearn_diff_atk import prefix_embeddings, prefixed_ids

__all__ = ["prefix_embeddings", "prefixed_ids"]
