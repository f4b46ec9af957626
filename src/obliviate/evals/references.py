"""When a retrain reference is too weak to measure against: a model of the same recipe can fall short in training (a
rebuilt MoE world's val10 reference knew 48 % of the retain answers against the full model's 95 %), and then forget
quality, PrivLeak and the noise-floor marks taken against it describe the reference, not the method. World builds
warn of it and the bench's report names it. Torch-free: a finished bench's report reads it without the models."""

# the most the reference's retain accuracy (exact answers) may lag the original's
WEAK_REFERENCE_GAP = 0.10


def weak_reference(which: str, original_retain: float, retrain_retain: float) -> str | None:
    """The sentence that names a weak reference (`which`: "the retrain reference of val10", ...), or None."""
    if retrain_retain >= original_retain - WEAK_REFERENCE_GAP:
        return None
    return (f"{which} knows {retrain_retain:.1%} of the retain answers against the original's {original_retain:.1%}: "
            "a weak reference (its training fell short); the scores against it (forget quality, PrivLeak, the noise "
            "floor's marks) are not evidence.")
