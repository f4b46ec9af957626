"""A local judge model for MLLMU-Bench's factuality score, in place of its paid GPT-4o-mini judge (eval_gpt.py):
any causal language model folder the user trusts (an instruction-tuned one; its chat template is used), asked
to rate a free answer against the ground truth from 1 to 10 with MLLMU-Bench's rubric, greedily; the first whole
number from 1 to 10 in its reply is the score, and a reply without one is no score (None), never a guess.

Optional and off by default (`mllm.judge_model`): its scores are only as good as the judge, and the built-in
worlds have no judge worth the name."""
from __future__ import annotations

import re
from typing import Sequence

RUBRIC = """Rate the factuality of a generated answer against the ground truth, from 1 to 10.
10-9: fully correct, the same meaning as the ground truth, even if phrased differently.
8-7: mostly correct, with a minor inaccuracy or omission.
6-5: partly correct, with a noticeable factual error or missing information.
4-3: major factual errors, or crucial elements missing.
2-1: incorrect or irrelevant.
Extra details that are not in the ground truth do not raise the score; irrelevant ones lower it.
Question: {question}
Ground truth: {truth}
Generated answer: {answer}
Reply with the score (1-10) first."""


def parse_score(reply: str) -> int | None:
    """The first whole number from 1 to 10 in the judge's reply (a standalone number), else None."""
    for match in re.finditer(r"(?<![\d.])(\d{1,2})(?![\d.])", reply):
        value = int(match.group(1))
        if 1 <= value <= 10:
            return value
    return None


def factuality_scores(judge, tokenizer, questions: Sequence[str], truths: Sequence[str], answers: Sequence[str],
                      batch_size: int = 16) -> list[int | None]:
    """One score per (question, ground truth, generated answer), the judge asked in its own prompt format."""
    from obliviate.models import causal_lm

    prompts = [causal_lm.question_prompt(tokenizer, RUBRIC.format(question=q, truth=t, answer=a))
               for q, t, a in zip(questions, truths, answers)]
    replies = causal_lm.generate(judge, tokenizer, prompts, max_new_tokens=8, batch_size=batch_size)
    return [parse_score(r) for r in replies]


def load_judge(folder, device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer) of a causal LM folder, in its own chat template when it has one."""
    from obliviate.models import causal_lm, prompt_format

    model, tokenizer = causal_lm.load(folder, device=device, trust_remote_code=trust_remote_code)
    prompt_format.use(tokenizer, prompt_format.resolve(tokenizer, "auto", None, {}))
    return model, tokenizer
