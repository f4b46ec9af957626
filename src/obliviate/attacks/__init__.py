"""Recovery attacks: does what a model unlearned come back? Each attack is a class with a `Config` dataclass (its
options, with the paper's defaults), registered in registry.ATTACKS with its family; a family's attack runner
(`Family.attack`) loads the run's models, runs the attack on the unlearned model, the original model (the ceiling)
and the retrain reference (the floor: a model that never saw the data), and writes RUN_DIR/attacks/<name>.json:

    attack, family, method     the attack, and the run it attacked
    config                     the attack's options
    headline, label, better    the aggregate key the robustness tables show, its title, and which way is safer
    models                     {model: aggregate}: the run's method first, then "original", then "retrain"
    per_item                   {model: [one row per attacked item]}
    seconds, items, items_per_second   the attack's cost (items: attacked items per model)
    curves                     (relearning) {model: [{"step": k, ...}]}
"""
