"""Where a language-model run's data comes from when it is the user's own (forget/retain files, TOFU's release, a
MUSE folder, evaluation sets with stated roles), read the same way by `run` and by its pre-run checks."""
from __future__ import annotations

from pathlib import Path

from obliviate.config import RunConfig
from obliviate.data import QAItem, load_qa_jsonl


def user_data(config: RunConfig):
    """(forget, retain, EvalData) from the user's files: TOFU's release, a MUSE folder, or forget/retain files, plus
    the config's eval_sets with their stated roles."""
    from obliviate.benchmark_files import EvalData, load_eval_set, load_muse, load_tofu

    if config.tofu_dir:
        bench = load_tofu(config.tofu_dir, config.split)
        forget, retain, data = bench.forget, bench.retain, bench.evaluation
    elif config.muse_dir:
        bench = load_muse(config.muse_dir)
        forget, retain, data = bench.forget, bench.retain, bench.evaluation
    else:
        forget, retain = _items(config.forget_file, "forget"), _items(config.retain_file, "retain")
        qa = {name: items for name, items in (("forget", forget), ("retain", retain)) if isinstance(items[0], QAItem)}
        data = EvalData(qa, {name: name for name in qa}, label=Path(config.forget_file).name)
    for extra in config.eval_sets:
        name, role, items = load_eval_set(extra.file, extra.role, extra.name)
        if role == "holdout":  # never-trained items: membership inference's non-members (the forget set: members)
            data.holdout_texts, data.member_texts = items, data.member_texts or data.qa_sets.get("forget", forget)
            continue
        name = role if role in ("forget", "retain") else name  # a stated forget/retain set is the one scored as such
        data.qa_sets[name], data.roles[name] = items, role
    return forget, retain, data


def _items(path, role: str) -> list:
    """A forget or retain file: TOFU-format question-answer lines, or a text corpus (JSON lines with a "text" key, as
    WMDP's corpora; a JSON array of texts; a .txt file) in 256-word chunks, trained on as MUSE's corpora are and
    scored by no question-answer metric (lm-evaluation-harness's tasks, `[harness]`, score what it taught)."""
    from obliviate.benchmark_files import is_text_corpus, load_corpus

    return load_corpus(path, role) if is_text_corpus(path) else load_qa_jsonl(path, role)


def uses_user_data(config: RunConfig) -> bool:
    return bool(config.forget_file or config.retain_file or config.tofu_dir or config.muse_dir)


def forgets(config: RunConfig) -> str:
    """What a run forgets, in words: the world's split, or the user's data (TOFU's split, a MUSE corpus, a file), by
    name only (it goes on a published model card, where the user's folders have no place)."""
    if config.tofu_dir:
        return f"TOFU's {config.split}"
    if config.muse_dir:
        return f"the MUSE corpus {Path(config.muse_dir).name}"
    if config.forget_file:
        return f"forget file {Path(config.forget_file).name}"
    return f"split {config.split}" + (f" after {config.forgotten_before}" if config.forgotten_before else "")


def subject_of(config: RunConfig) -> str:
    """What a run forgets, in its folder name: the world's split, TOFU's split, the MUSE corpus or the forget file."""
    if config.tofu_dir:
        return f"tofu-{config.split}"
    if config.muse_dir:
        return f"muse-{Path(config.muse_dir).name}"
    if config.forget_file:
        return Path(config.forget_file).stem
    return config.split
