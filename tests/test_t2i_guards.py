"""Generation-time guards (obliviate.guards): SLD and NegToMe on the tiny SD-shaped pipeline. SLD's combination is
the paper's formula re-typed here; each guard's off-setting gives CFG's pictures exactly; a guard run changes no
tensor, records its config, evaluates and is attacked through the guard (with the unguarded weights as the
counter-case); its export loads with the documented call and draws the run's pictures."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import one_line_error, tiny_prompts
from obliviate.cli import app
from obliviate.errors import ObliviateError
from obliviate.methods.common import make_method
from test_canvas_world import tiny_world  # noqa: F401 (a fixture)
from test_t2i_attack_detectors import detector_dirs  # noqa: F401 (a fixture)
from test_t2i_runs import _config, _digest

runner = CliRunner()
PROMPTS, SEEDS = tiny_prompts()[:3], [0, 1, 2]


def _guard(name: str, **args):
    return make_method("t2i", name, args).bind("striped")


def _sld_reference(u, c, s, steps, g, s_s, delta, lam, s_m, beta):
    """The paper's eqs. 3-8 (as diffusers' StableDiffusionPipelineSafe runs them), re-typed per step."""
    nu, out = torch.zeros_like(u[0]), []
    for i in range(steps):
        mu = torch.where(c[i] - s[i] < lam, torch.clamp(s_s * (c[i] - s[i]).abs(), max=1.0), torch.zeros_like(u[i]))
        gamma = mu * (s[i] - u[i]) + s_m * nu
        nu = beta * nu + (1 - beta) * gamma
        out.append(u[i] + g * ((c[i] - u[i]) - (gamma if i >= delta else 0)))
    return out


@pytest.mark.parametrize("preset, args", [("medium", {}), ("strong", {"warmup_steps": 2}),
                                          ("max", {"guidance_scale": 3.0, "threshold": 0.0})])
def test_sld_combine_is_the_papers_formula(preset, args):
    gen = torch.Generator().manual_seed(0)
    steps = 12  # past the medium preset's warm-up (10)
    u, c, s = (torch.randn(steps, 2, 4, 3, 3, generator=gen) * 0.05 for _ in range(3))
    sld = _guard("SLD", preset=preset, **args)
    cfg = sld.config
    sld.momentum, sld.guidance = None, 7.5  # what begin() sets for a sampling call
    got = [sld.combine(i, 900 - 100 * i, None, u[i], c[i], {"striped": s[i]}) for i in range(steps)]
    want = _sld_reference(u, c, s, steps, 7.5, cfg.guidance_scale, cfg.warmup_steps, cfg.threshold,
                          cfg.momentum_scale, cfg.momentum_beta)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the safety term acted: after the warm-up the result is not CFG's
    assert not torch.allclose(got[-1], u[-1] + 7.5 * (c[-1] - u[-1]))


def test_sld_presets_are_diffusers():
    try:
        from diffusers.pipelines.deprecated.stable_diffusion_safe import SafetyConfig
    except ImportError:  # diffusers before 0.36 (the lowest pyproject declares) kept it outside `deprecated`
        from diffusers.pipelines.stable_diffusion_safe import SafetyConfig

    for preset in ("weak", "medium", "strong", "max"):
        cfg = _guard("SLD", preset=preset).config
        theirs = getattr(SafetyConfig, preset.upper())
        assert (cfg.guidance_scale, cfg.warmup_steps, cfg.threshold, cfg.momentum_scale, cfg.momentum_beta) == (
            theirs["sld_guidance_scale"], theirs["sld_warmup_steps"], theirs["sld_threshold"],
            theirs["sld_momentum_scale"], theirs["sld_mom_beta"])


def test_guards_off_give_cfg_exactly_and_on_change_the_picture(tiny_pipe):
    from obliviate.models.diffusion import sample

    plain = sample(tiny_pipe, PROMPTS, SEEDS, 4, 4.0)
    assert torch.equal(sample(tiny_pipe, PROMPTS, SEEDS, 4, 4.0, guard=_guard("SLD", guidance_scale=0.0)), plain)
    # NegToMe with alpha 0: the negative images are sampled in the same batch, and merging leaves every token as is
    negtome_off = _guard("NegToMe", alpha=0.0, t_end=0.0)
    assert torch.equal(sample(tiny_pipe, PROMPTS, SEEDS, 4, 4.0, guard=negtome_off), plain)
    assert not torch.equal(sample(tiny_pipe, PROMPTS, SEEDS, 4, 4.0, guard=_guard("SLD", warmup_steps=0)), plain)
    on = sample(tiny_pipe, PROMPTS, SEEDS, 4, 4.0, guard=_guard("NegToMe", t_end=0.0))
    assert not torch.equal(on, plain)
    # a prompt and seed give the same guarded picture in any batch (each image has its own negative image)
    torch.testing.assert_close(sample(tiny_pipe, PROMPTS[1:2], SEEDS[1:2], 4, 4.0,
                                      guard=_guard("NegToMe", t_end=0.0)), on[1:2], rtol=0, atol=1e-5)
    # outside its timestep range NegToMe does nothing (4 DDIM steps: t = 750, 500, 250, 0; the default range is
    # t >= 800)
    assert torch.equal(sample(tiny_pipe, PROMPTS, SEEDS, 4, 4.0, guard=_guard("NegToMe")), plain)
    # a guard given to one call leaves the UNet's own processors in place after it
    own = dict(tiny_pipe.unet.attn_processors)
    assert all(type(p).__name__ != "_MergingProcessor" for p in own.values())
    # inside `applied` the pipeline samples through the guard; after it, its own processors are back
    guard = _guard("NegToMe", t_end=0.0)
    with guard.applied(tiny_pipe):
        assert tiny_pipe.guard is guard and torch.equal(sample(tiny_pipe, PROMPTS, SEEDS, 4, 4.0), on)
        # a call that is not the guard's, on the UNet its processors sit on, is the plain UNet's
        assert torch.equal(sample(tiny_pipe, PROMPTS, SEEDS, 4, 4.0, guard=_guard("SLD", guidance_scale=0)), plain)
    assert tiny_pipe.guard is None and dict(tiny_pipe.unet.attn_processors) == own


def test_negative_merge_is_the_papers_rule():
    from obliviate.guards.t2i.negtome import negative_merge

    gen = torch.Generator().manual_seed(1)
    x, neg = torch.randn(2, 5, 4, generator=gen), torch.randn(2, 6, 4, generator=gen)
    out = negative_merge(x, neg, 0.9, 0.3)
    for b in range(2):
        for i in range(5):
            sims = torch.stack([torch.nn.functional.cosine_similarity(x[b, i], neg[b, j], dim=0) for j in range(6)])
            j = int(sims.argmax())
            want = (1.9 * x[b, i] - 0.9 * neg[b, j]) if sims[j] > 0.3 else x[b, i]
            torch.testing.assert_close(out[b, i], want)
    assert not torch.equal(out, x)  # some token was over the threshold


def _run(tmp_path, pipeline, method, *extra_lines, **t2i):
    config = _config(tmp_path, pipeline, method, **t2i)
    if extra_lines:
        text = config.read_text().replace("[train]", "\n".join(extra_lines) + "\n[train]")
        config.write_text(text)
    result = runner.invoke(app, ["run", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    return tmp_path / "runs" / "r1"


def test_guard_run_records_config_evaluates_through_the_guard_and_exports(tmp_path, tiny_pipeline_dir,
                                                                         detector_dirs):
    from safetensors.torch import load_file

    from obliviate.guards import load_guarded
    from obliviate.models.diffusion import load_pipeline, sample

    clip_dir, vit_dir = detector_dirs
    before = _digest(tiny_pipeline_dir)
    run = _run(tmp_path, tiny_pipeline_dir, "SLD", 'method_args = {warmup_steps = 0}', clip_model=str(clip_dir),
               detector=str(vit_dir), detector_label="striped", eval_prompts=2)
    assert load_file(str(run / "changed.safetensors")) == {}  # no tensor changes
    assert _digest(tiny_pipeline_dir) == before
    record = json.loads((run / "obliviate_guard.json").read_text())
    assert record["guard"] == "SLD" and record["concept"] == "striped" and record["config"]["warmup_steps"] == 0
    assert record["config"]["guidance_scale"] == 1000.0 and record["sample_steps"] == 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["guard"] == record
    assert "SLD is a generation-time guard: no weight changed" in (run / "report.html").read_text()
    # the evaluation sampled through the guard: the rows' pictures differ from the original's
    rows = json.loads((run / "per_item.json").read_text())
    assert any(r["erased_alignment"] != r["original_alignment"] for r in rows)
    texts, seeds = [r["text"] for r in rows], [r["seed"] for r in rows]
    from obliviate.evals.user_pipeline import UserClip
    guarded = sample(load_pipeline(tiny_pipeline_dir), texts, seeds, 3, 4.0, guard=_guard("SLD", warmup_steps=0))
    assert [r["erased_alignment"] for r in rows] == pytest.approx(
        UserClip(clip_dir).alignment(guarded, texts).tolist(), abs=1e-5)

    result = runner.invoke(app, ["export", str(run), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    assert "obliviate.guards.load_guarded(" in result.output
    assert json.loads((tmp_path / "exported" / "obliviate_guard.json").read_text()) == record
    assert "A generation-time guard" in (tmp_path / "exported" / "README.md").read_text()  # the model card says so
    pipe = load_guarded(tmp_path / "exported")
    assert torch.allclose(pipe(texts, seeds), guarded, atol=1e-6)


def test_attack_on_a_guard_run_reports_guarded_and_unguarded_rows(tmp_path, tiny_pipeline_dir, detector_dirs):
    clip_dir, vit_dir = detector_dirs
    run = _run(tmp_path, tiny_pipeline_dir, "NegToMe", 'method_args = {t_end = 0.0}', detector=str(vit_dir),
               detector_label="striped", eval_prompts=2)
    result = runner.invoke(app, ["attack", str(run), "--attack", "prompt_attack", "iterations=1", "check_every=1",
                                 "prefix_tokens=2", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "attacks" / "prompt_attack.json").read_text())
    assert list(saved["models"]) == ["NegToMe", "original", "NegToMe (unguarded)"]
    assert saved["per_item"]["NegToMe (unguarded)"] == saved["per_item"]["original"]
    assert "the guard changes no weight" in saved["caption"]
    from obliviate.bench.scorecard import robustness_rows
    _, rows = robustness_rows({"NegToMe": {"prompt_attack": saved}})
    assert list(rows) == ["NegToMe", "NegToMe (unguarded)", "original"]


@pytest.mark.parametrize("name, args, message", [
    ("SLD", {"preset": "extreme"}, "preset must be one of weak, medium, strong, max"),
    ("SLD", {"momentum_beta": 1.0}, "momentum_beta must be in [0, 1)"),
    ("SLD", {"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ("SLD", {"guidance_scale": "high"}, "guidance_scale must be a finite number"),
    ("NegToMe", {"alpha": -0.5}, "alpha must be >= 0"),
    ("NegToMe", {"threshold": 2}, "threshold must be a cosine similarity in [-1, 1]"),
    ("NegToMe", {"t_start": 0.5, "t_end": 0.8}, "0 <= t_end <= t_start <= 1"),
    ("NegToMe", {"strength": 1}, "unknown key(s) ['strength'] for NegToMe"),
    ("GoG", {"alpha": 1.5}, "alpha must be a number in [0, 1]"),
    ("GoG", {"blend": "latent"}, "blend must be one of prediction, embedding"),
    ("GoG", {"detect": "llm"}, "detect must be one of words, embedding, either, always"),
    ("GoG", {"synonyms": "mario"}, "synonyms must be a list of non-empty strings"),
    ("GoG", {"rewrites": {"a": 1}}, "rewrites must be a table of prompt = rewritten prompt strings"),
])
def test_bad_guard_settings_are_one_line_errors(name, args, message):
    with pytest.raises(ObliviateError) as e:
        make_method("t2i", name, args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_guard_setting_in_a_run_is_one_line(tmp_path, tiny_pipeline_dir):
    config = _config(tmp_path, tiny_pipeline_dir, "NegToMe")
    config.write_text(config.read_text().replace("[train]", 'method_args = {blocks = ["side_blocks"]}\n[train]'))
    result = runner.invoke(app, ["run", str(config), "--quiet"])
    one_line_error(result, "NegToMe: blocks ['side_blocks'] hold none of the UNet's attention layers")
    assert not (tmp_path / "runs" / "r1").exists()


def test_a_run_on_a_guarded_export_is_refused(tmp_path, tiny_pipeline_dir):
    import shutil

    guarded = tmp_path / "guarded"
    shutil.copytree(tiny_pipeline_dir, guarded)
    (guarded / "obliviate_guard.json").write_text(json.dumps(_guard("SLD").describe()))
    result = runner.invoke(app, ["run", str(_config(tmp_path, guarded, "ESD-x")), "--quiet"])
    one_line_error(result, "carries a generation-time guard (obliviate_guard.json)", "obliviate.guards.load_guarded")


def test_load_guarded_refuses_a_plain_folder(tiny_pipeline_dir):
    from obliviate.guards import load_guarded

    with pytest.raises(ObliviateError, match="no obliviate_guard.json"):
        load_guarded(tiny_pipeline_dir)


@pytest.mark.parametrize("record, message", [
    ({"guard": "SLD"}, "a guard record is a JSON object with guard, family and config"),
    ({"guard": "ESD-x", "family": "t2i", "config": {}}, "ESD-x is not a generation-time guard"),
    ({"guard": "SLD", "family": "t2i", "config": {"threshold": "low"}}, "threshold must be a finite number"),
])
def test_bad_guard_records_are_one_line_errors(tmp_path, record, message):
    from obliviate.guards import read_guard

    (tmp_path / "obliviate_guard.json").write_text(json.dumps(record))
    with pytest.raises(ObliviateError) as e:
        read_guard(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # a tiny canvas world build, a run and three attacks: 1-4 min on 2 shared cores
def test_guard_run_and_attack_on_the_tiny_canvas_world(tiny_world, tmp_path):
    from safetensors.torch import load_file

    from obliviate.api import attack_run
    from obliviate.config import build_config
    from obliviate.evals.canvas import eval_prompts
    from obliviate.models.diffusion import load_pipeline, sample
    from obliviate.runners import run
    from test_canvas_world import TINY

    t2i = {"images_per_prompt": 1, "sample_steps": 2, "eval_seeds": 1, "grid_prompts": 4}
    config = build_config({
        "method": "SLD", "method_args": {"warmup_steps": 0}, "concept": "striped", "output_dir": str(tmp_path),
        "name": "sld", "world": {"name": "canvas", "cache_dir": tiny_world.cache_dir, "model": TINY}, "t2i": t2i})
    folder = run(config, log=lambda *a: None)
    assert load_file(str(folder / "changed.safetensors")) == {}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["guard"]["guard"] == "SLD" and "ua" in metrics and "original_ua" in metrics
    # the evaluation's pictures are the guarded ones: re-drawn here, they differ from the original's
    prompts, seeds = eval_prompts(tiny_world, 1)
    texts = [p.text for p in prompts][:6]
    pipe = load_pipeline(tiny_world.pipeline_dir)
    assert not torch.equal(sample(pipe, texts, seeds[:6], 2, config.t2i.guidance, guard=_guard("SLD", warmup_steps=0)),
                           sample(pipe, texts, seeds[:6], 2, config.t2i.guidance))

    results = attack_run(folder, "prompt_attack", {"iterations": 1, "check_every": 1, "prefix_tokens": 1},
                         log=lambda *a: None)
    models = results["prompt_attack"]["models"]
    assert list(models)[:2] == ["SLD", "original"] and "SLD (unguarded)" in models
    assert results["prompt_attack"]["per_item"]["SLD (unguarded)"] == results["prompt_attack"]["per_item"]["original"]
    # a guard run whose weights are another folder's (here a copy of the world's pipeline): the unguarded row is
    # that folder attacked without the guard, which for the same weights is the original's result again
    import shutil

    from obliviate.api import attack_instances
    from obliviate.registry import ATTACKS
    from obliviate.runners.t2i_attack import attack_run as t2i_attack_run

    copy = tmp_path / "copy"
    shutil.copytree(tiny_world.pipeline_dir, copy)
    attack = attack_instances([ATTACKS["prompt_attack"]], {"iterations": 1, "check_every": 1, "prefix_tokens": 1})
    again = t2i_attack_run(folder, config.model_copy(update={"model": str(copy)}), attack, log=lambda *a: None)
    per_item = again["prompt_attack"]["per_item"]
    assert per_item["SLD (unguarded)"] == per_item["original"]
    assert "the guard changes no weight" not in (again["prompt_attack"].get("caption") or "")


def test_gog_detects_and_rewrites_by_words_synonyms_table_and_similarity(tiny_pipe):
    gog = _guard("GoG", synonyms=["zebra pattern"], replacement="plain", rewrites={"a striped cat": "a tabby cat"})
    assert gog.detect(tiny_pipe, ["a Striped dog", "zebra pattern sofa"]) == [True, True]  # either: words suffice
    words = _guard("GoG", detect="words", synonyms=["zebra pattern"], replacement="plain")
    assert words.detect(tiny_pipe, ["a Striped dog", "zebra pattern sofa", "stripedness", "a red star"]) == [
        True, True, False, False]
    assert gog.rewrite("a Striped dog, striped") == "a plain dog, plain"
    assert gog.rewrite("a striped cat") == "a tabby cat"  # the table wins
    assert gog.rewrite("a red star") == "plain"  # flagged by similarity alone: the replacement
    # similarity: the concept itself is at cosine 1; threshold -1 flags every prompt, 1 only the concept's own text
    sims = gog.similarity(tiny_pipe, ["striped", "a red star"])
    assert sims[0] == pytest.approx(1.0, abs=1e-5) and sims[1] < 1
    assert _guard("GoG", detect="embedding", similarity_threshold=-1.0).detect(tiny_pipe, ["a red star"]) == [True]
    assert _guard("GoG", detect="embedding", similarity_threshold=0.99999).detect(
        tiny_pipe, ["striped", "a red star"]) == [True, False]


def test_gog_combine_is_the_papers_formula():
    gen = torch.Generator().manual_seed(0)
    u, c, s = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    gog = _guard("GoG", alpha=0.7)
    gog.guidance, gog.flagged = 3.0, torch.tensor([True, False]).view(-1, 1, 1, 1)
    got = gog.combine(0, 900, None, u, c, {"<GoG rewritten prompt>": s})
    torch.testing.assert_close(got[0], u[0] + 3.0 * (0.7 * c[0] + 0.3 * s[0] - u[0]))
    assert torch.equal(got[1], u[1] + 3.0 * (c[1] - u[1]))  # an unflagged prompt: CFG exactly


@pytest.mark.parametrize("blend", ["prediction", "embedding"])
def test_gog_samples_cfg_for_clean_prompts_and_the_rewrite_at_alpha_zero(tiny_pipe, blend):
    from obliviate.models.diffusion import sample

    clean = ["a red star", "a blue circle"]
    assert torch.equal(sample(tiny_pipe, clean, [0, 1], 3, 4.0, guard=_guard("GoG", detect="words", blend=blend)),
                       sample(tiny_pipe, clean, [0, 1], 3, 4.0))
    named = ["a red star in striped style", "a blue circle"]
    rewritten = ["a red star in dotted style", "a blue circle"]
    plain = sample(tiny_pipe, named, [0, 1], 3, 4.0)
    gog = _guard("GoG", detect="words", blend=blend, replacement="dotted", alpha=0.0)
    guarded = sample(tiny_pipe, named, [0, 1], 3, 4.0, guard=gog)
    assert gog.last_flags == [True, False]
    torch.testing.assert_close(guarded, sample(tiny_pipe, rewritten, [0, 1], 3, 4.0), atol=1e-5, rtol=0)
    assert not torch.allclose(guarded[0], plain[0], atol=1e-3)
    half = sample(tiny_pipe, named, [0, 1], 3, 4.0, guard=_guard("GoG", detect="words", blend=blend, alpha=0.5,
                                                                 replacement="dotted"))
    assert not torch.allclose(half[0], guarded[0], atol=1e-3) and not torch.allclose(half[0], plain[0], atol=1e-3)


def test_gog_fails_closed_on_conditioning_it_cannot_read(tiny_pipe):
    from obliviate.models.diffusion import denoise, encode

    gog = _guard("GoG", detect="words")
    context = encode(tiny_pipe, ["a red star"])
    denoise(tiny_pipe, ["a red star"], [0], 2, 4.0, context=context, guard=gog)
    assert gog.last_flags == [True]
    denoise(tiny_pipe, ["a red star"], [0], 2, 4.0, guard=gog)
    assert gog.last_flags == [False]
