"""The concept-arithmetic attack on the tiny SD-shaped pipeline: the composition formula (re-typed here), that one term
of weight 1 samples exactly as `denoise`, the compositions derived from a forget prompt, the success bookkeeping,
`obliviate attack --attack concept_arithmetic` on an erased run (rows, pictures) and its bad settings (one line)."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, tiny_prompts
from obliviate.attacks.t2i.common import AttackTask, summarize
from obliviate.attacks.t2i.concept_arithmetic import (ConceptArithmetic, ConceptArithmeticConfig, combine,
                                                      compose_denoise, composition_terms, describe)
from obliviate.cli import app
from obliviate.errors import ObliviateError
from test_t2i_attack_detectors import _user_run, detector_dirs  # noqa: F401 (a fixture)

runner = CliRunner()


def test_combine_is_the_composable_diffusion_sum():
    g = torch.Generator().manual_seed(0)
    u, a, b, c = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(4))
    # eps_u + g * sum_i w_i (eps_i - eps_u), typed out
    expected = u + 7.5 * (0.5 * (a - u) + 2.0 * (b - u) - 1.5 * (c - u))
    assert torch.allclose(combine(u, [a, b, c], [0.5, 2.0, -1.5], 7.5), expected, atol=1e-6)
    assert torch.equal(combine(u, [a], [1.0], 4.0), u + 4.0 * (a - u))  # one term: classifier-free guidance
    assert torch.allclose(combine(u, [a, a], [0.5, 0.5], 3.0), u + 3.0 * (a - u), atol=1e-6)
    with pytest.raises(ObliviateError, match="2 predictions and 1 weights"):
        combine(u, [a, b], [1.0], 1.0)


def test_one_term_of_weight_one_samples_as_denoise(tiny_pipe):
    from obliviate.models.diffusion import denoise

    prompts, seeds = tiny_prompts()[:3], [0, 1, 2]
    plain, _ = denoise(tiny_pipe, prompts, seeds, 3, 4.0)
    assert torch.equal(compose_denoise(tiny_pipe, [prompts], [1.0], seeds, 3, 4.0), plain)
    # a second term changes the picture; the same term split in two halves does not (up to rounding)
    other = compose_denoise(tiny_pipe, [prompts, ["a red star"] * 3], [1.0, 1.0], seeds, 3, 4.0)
    halves = compose_denoise(tiny_pipe, [prompts, prompts], [0.5, 0.5], seeds, 3, 4.0)
    assert not torch.allclose(other, plain, atol=1e-3) and torch.allclose(halves, plain, atol=1e-4)


def test_compositions_from_a_forget_prompt():
    prompt = "a red star in striped style"

    def terms(paraphrased=(), **config):
        return composition_terms(ConceptArithmeticConfig(**config), prompt, "striped", list(paraphrased))

    assert terms() == [("a red star in style", 1.0), ("striped", 1.0)]
    assert terms(composition="negation") == [("a red star in style", 2.0), (prompt, -1.0)]
    assert terms(["a red star with stripes", "a red star lined"], composition="paraphrase") == [
        ("a red star with stripes", 0.5), ("a red star lined", 0.5)]
    # the attack's own words replace the task's
    assert terms(["ignored"], composition="paraphrase", paraphrases=["banded"]) == [("a red star in banded style", 1.0)]
    custom = terms(composition="custom", prompts=["{without}", "{concept} style", "{paraphrase}"],
                   weights=[1, 1.5, -1], paraphrases=["lined", "banded"])
    assert custom == [("a red star in style", 1.0), ("striped style", 1.5), ("a red star in lined style", -0.5),
                      ("a red star in banded style", -0.5)]
    assert describe(custom[:2] + custom[3:]) == ("+1 [a red star in style] +1.5 [striped style] "
                                                 "-0.5 [a red star in banded style]")
    with pytest.raises(ObliviateError, match="needs other words for the concept 'striped': give the attack paraph"):
        terms(composition="paraphrase")


def _task(pipe, prompts, detect, **extra) -> AttackTask:
    from obliviate.models.diffusion import initial_noise

    return AttackTask(prompts, [0] * len(prompts), initial_noise(pipe, [100] * len(prompts)), detect, pipe,
                      sample_steps=2, concept="striped", **extra)


def test_attack_bookkeeping(tiny_pipe):
    from obliviate.models.diffusion import decode, denoise

    prompts = [p for p in tiny_prompts() if "striped" in p]
    attack = ConceptArithmetic(ConceptArithmeticConfig(batch_size=2))
    rows, images = attack.attack(tiny_pipe, _task(tiny_pipe, prompts, lambda x: [True] * len(x)))
    assert all(r["pre_success"] and r["iteration"] == 0 and r["adversarial_prompt"] is None for r in rows)
    assert torch.allclose(images, decode(tiny_pipe, denoise(tiny_pipe, prompts, [0] * 3, 2, 4.0)[0]), atol=1e-6)

    calls = []

    def composed_second_finds_it(images):  # the plain pictures, then the compositions in batches of 2 and 1
        calls.append(len(images))
        return [len(calls) == 2 and i == 1 for i in range(len(images))]

    rows, images = attack.attack(tiny_pipe, _task(tiny_pipe, prompts, composed_second_finds_it))
    assert calls == [3, 2, 1]
    assert [r["iteration"] for r in rows] == [None, 1, None] and [r["success"] for r in rows] == [False, True, False]
    assert summarize(rows) == pytest.approx({"pre_asr": 0.0, "asr": 1 / 3, "ua_attacked": 2 / 3, "n_attacked": 3})
    second = rows[1]
    assert second["terms"] == [[prompts[1].replace(" striped", ""), 1.0], ["striped", 1.0]]
    assert second["adversarial_prompt"] == f"+1 [{prompts[1].replace(' striped', '')}] +1 [striped]"
    composed = compose_denoise(tiny_pipe, [[prompts[1].replace(" striped", "")], ["striped"]], [1.0, 1.0], [0], 2,
                               4.0)
    assert torch.allclose(images[1], decode(tiny_pipe, composed)[0], atol=1e-5)  # the picture is the composition's
    # the scale option replaces the run's guidance
    scaled = ConceptArithmetic(ConceptArithmeticConfig(scale=1.5)).attack(
        tiny_pipe, _task(tiny_pipe, prompts[:1], lambda x: [False] * len(x)))[1]
    assert not torch.allclose(scaled, images[:1], atol=1e-3)
    with pytest.raises(ObliviateError, match="needs the attacked concept's word"):
        attack.attack(tiny_pipe, AttackTask(prompts, [0] * 3, torch.zeros(3, 4, 2, 2), lambda x: [False] * len(x)))


@pytest.mark.parametrize("options, needle", [
    (["composition=sum"], "composition must be one of parts, paraphrase, negation, custom, got 'sum'"),
    (["composition=custom"], "the custom composition needs prompts"),
    (["composition=custom", "prompts=[\"{without}\", \"{concept}\"]", "weights=[1]"], "2 prompts and 1 weights"),
    (["composition=custom", "prompts=\"{object} style\"", "weights=1"], "names {object}; a template may name"),
    (["weights=[1, 2]"], "prompts and weights go with composition=custom, not 'parts'"),
    (["scale=-1"], "attack scale must be positive, got -1"),
    (["weights=abc", "composition=custom"], "attack option concept_arithmetic.weights must be"),
])
def test_bad_settings_are_one_line(tmp_path, tiny_pipeline_dir, options, needle):
    """Checked before any model loads: a run folder that was never run is enough."""
    from obliviate.config import RunConfig
    from obliviate.runs import write_json

    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "config.json", RunConfig(family="t2i", method="UCE", concept="striped",
                                              model=str(tiny_pipeline_dir), forget_prompts="f.txt",
                                              retain_prompts="r.txt").model_dump())
    (run / "changed.safetensors").write_bytes(b"")
    one_line_error(runner.invoke(app, ["attack", str(run), "--attack", "concept_arithmetic", *options]), needle)
    assert sorted(p.name for p in run.iterdir()) == ["changed.safetensors", "config.json"]


def test_attack_an_erased_run(tmp_path, tiny_pipeline_dir, detector_dirs):  # noqa: F811
    _, vit_dir = detector_dirs
    run = _user_run(tmp_path, tiny_pipeline_dir)
    result = runner.invoke(app, ["attack", str(run), "--attack", "concept_arithmetic", "composition=negation",
                                 "--detector", str(vit_dir), "--detector-label", "striped", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "attacks" / "concept_arithmetic.json").read_text())
    forget = [p for p in tiny_prompts() if "striped" in p]
    assert saved["attack"] == "concept_arithmetic" and saved["config"]["composition"] == "negation"
    assert list(saved["models"]) == ["UCE", "original"] and saved["label"] == "concept arithmetic ASR"
    for model, rows in saved["per_item"].items():
        assert [r["text"] for r in rows] == forget
        assert all(r["terms"] == [[p.replace(" striped", ""), 2.0], [p, -1.0]] for r, p in zip(rows, forget))
        assert all(r["success"] == (r["pre_success"] or r["composed_success"]) for r in rows)
        a = saved["models"][model]
        assert a["n_attacked"] == 3 and 0 <= a["pre_asr"] <= a["asr"] <= 1
    assert (run / "attacks" / "concept_arithmetic.png").is_file()


def test_canvas_paraphrases_of_the_forget_prompts():
    from obliviate.attacks.t2i.canvas import concept_paraphrases

    assert concept_paraphrases("star", ["a red star in striped style", "a blue star in solid style"]) == [
        ["a red pentagram in striped style"], ["a blue pentagram in solid style"]]
    assert concept_paraphrases("striped", ["a red star in striped style"]) == [["a red star with stripes"]]
    terms = composition_terms(ConceptArithmeticConfig(composition="paraphrase"), "a red star in striped style",
                              "striped", ["a red star with stripes"])
    assert terms == [("a red star with stripes", 1.0)]
