"""obliviate: machine unlearning for generative models, with honest evidence.

Python API (imports are lazy, so `import obliviate` is instant):
    obliviate.unlearn(model, tokenizer, forget_items, retain_items, "NPO", train=TrainConfig(lr=1e-5))
    obliviate.evaluate(model, tokenizer, {"forget": [...], "retain": [...]})
    obliviate.run(RunConfig(method="GradDiff"))
"""
__version__ = "0.1.0"

_LAZY = {
    "unlearn": "obliviate.loops.lm:unlearn",
    "make_method": "obliviate.methods.common:make_method",
    "erase": "obliviate.loops.t2i:erase",
    "evaluate": "obliviate.evals.evaluate:evaluate_lm",
    "compare_to_retrain": "obliviate.evals.evaluate:compare_to_retrain",
    "run": "obliviate.runners:run",
    "RunConfig": "obliviate.config:RunConfig",
    "TrainConfig": "obliviate.config:TrainConfig",
    "LMTrainConfig": "obliviate.config:LMTrainConfig",
    "LoraConfig": "obliviate.config:LoraConfig",
    "WorldConfig": "obliviate.config:WorldConfig",
    "load_config": "obliviate.config:load_config",
    "QAItem": "obliviate.data:QAItem",
    "load_qa_jsonl": "obliviate.data:load_qa_jsonl",
    "ProfilesWorld": "obliviate.worlds.profiles:ProfilesWorld",
    "ObliviateError": "obliviate.errors:ObliviateError",
}


def __getattr__(name):
    # Only called for names not yet in the module's namespace. No submodule may share an API name: importing
    # obliviate.X sets the attribute X on this package and would hide the function (tests/test_families.py).
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name].split(":")
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'obliviate' has no attribute {name!r}")


__all__ = list(_LAZY)
