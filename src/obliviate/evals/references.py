"""When a retrain reference is too weak to measure against: a model of the same recipe can fall short in training (a
rebuilt MoE world's val10 reference knew 48 % of the retain answers against the full model's 95 %), and then forget
quality, PrivLeak and the noise-floor marks taken against it describe the reference, not the method. World builds
warn of it and the bench's report names it. Torch-free: a finished bench's report reads it without the models."""

# the most the reference's retain accuracy (exact answers) may lag the original's
WEAK_REFERENCE_GAP = 0.10


def is_weak_reference(original_retain: float, retrain_retain: float) -> bool:
    return retrain_retain < original_retain - WEAK_REFERENCE_GAP
