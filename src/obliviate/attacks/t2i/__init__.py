"""Attacks on erased text-to-image models: does a prompt bring the erased concept back? Each attack (a class with a
`Config`, registered in registry.ATTACKS) runs on one pipeline through `attack(pipe, task)` and returns one row per
attacked prompt and the picture each ended with; `common.AttackTask` holds what every attack is given (the forget
prompts and seeds, the original's latents for them, the original pipeline, the concept detector). The runner
(runners/t2i_attack.py) attacks the erased pipeline, the original and the retrain reference, and writes the result.

    unlearn_diff_atk.py   UnlearnDiffAtk: optimised prefix tokens before each forget prompt (prompt_attack)
    p4d.py                P4D-N / P4D-K: soft tokens matched to the original's noise prediction (p4d_n, p4d_k)
    ring_a_bell.py        Ring-A-Bell: a genetic search towards prompt + eta * concept vector (ring_a_bell)
    concept_arithmetic.py concept arithmetic: the concept composed from other prompts' predictions (concept_arithmetic)
    canvas.py             the canvas world's targets, detector and cached reference results
    detectors.py          a user's detector: a CLIP folder (zero-shot) or an image-classifier folder
"""
