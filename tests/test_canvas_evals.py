"""Canvas text-to-image evaluation: UA/IRA/CRA by hand, FID/KID through torchmetrics on a fixed random feature
module, the CLIP alignment score against a hand-computed cosine, and the report grid. Tiny modules built in code."""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from obliviate.errors import ObliviateError
from obliviate.evals import canvas

OBJECTS = ["circle", "square", "star"]
STYLES = ["solid", "striped", "dotted"]


@dataclass(frozen=True)
class Prompt:
    text: str
    object: str
    style: str
    colour: str
    kind: str = "train"


def row(obj, style, pred_obj, pred_style, kind="train"):
    return {"text": f"a red {obj} in {style} style", "seed": 0, "kind": kind, "object": obj, "style": style,
            "colour": "red", "pred_object": pred_obj, "pred_style": pred_style, "alignment": None}


class TinyClassifier(nn.Module):
    """Fixed random features of a 16x16 image and two linear heads; refuses any other size, so a 299x299 dummy
    input from torchmetrics would fail the test."""

    def __init__(self, size: int = 16, num_features: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.size, self.num_features = size, num_features
        self.objects, self.styles = list(OBJECTS), list(STYLES)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, num_features), nn.Tanh())
        self.heads = nn.ModuleDict({"object": nn.Linear(num_features, len(OBJECTS)),
                                    "style": nn.Linear(num_features, len(STYLES))})

    def features(self, images):
        assert images.shape[-2:] == (self.size, self.size) and images.dtype == torch.float32, images.shape
        return self.body(images)

    def forward(self, images):
        f = self.features(images)
        return {k: h(f) for k, h in self.heads.items()}


# ---- UA / IRA / CRA ----------------------------------------------------------------------------------------------


def test_canvas_scores_by_hand_style_erasure():
    rows = [
        # forget (style striped), train prompts: 2 of 3 no longer striped -> UA 2/3
        row("circle", "striped", "circle", "solid"),
        row("square", "striped", "square", "striped"),
        row("star", "striped", "circle", "dotted"),
        # retain (other styles): style right in 3 of 4 -> IRA 3/4; object right in 2 of 4 -> CRA 2/4
        row("circle", "solid", "circle", "solid"),
        row("square", "dotted", "star", "dotted"),
        row("star", "solid", "star", "striped"),
        row("circle", "dotted", "square", "dotted"),
        # paraphrases: kept out of UA/IRA/CRA; forget paraphrases: 1 of 2 erased -> ua_paraphrase 1/2
        row("circle", "striped", "circle", "striped", kind="paraphrase"),
        row("star", "striped", "star", "solid", kind="paraphrase"),
        row("star", "solid", "circle", "dotted", kind="paraphrase"),
    ]
    s = canvas.canvas_scores(rows, "striped", "style")
    assert s["ua"] == pytest.approx(2 / 3)
    assert s["ira"] == pytest.approx(3 / 4)
    assert s["cra"] == pytest.approx(2 / 4)
    assert s["ua_paraphrase"] == pytest.approx(1 / 2)
    assert (s["n_forget"], s["n_forget_paraphrase"], s["n_retain"]) == (3, 2, 4)
    acc = canvas.attribute_accuracy(rows)
    assert acc["object"] == pytest.approx(6 / 10)  # over every row, paraphrases included
    assert acc["style"] == pytest.approx(5 / 10)


def test_canvas_scores_object_erasure_and_errors():
    rows = [row("star", "solid", "circle", "solid"), row("star", "dotted", "star", "solid"),
            row("circle", "solid", "circle", "dotted"), row("square", "striped", "circle", "striped")]
    s = canvas.canvas_scores(rows, "star", "object")
    assert s["ua"] == pytest.approx(1 / 2)
    assert s["ira"] == pytest.approx(1 / 2)  # object accuracy on circle/square prompts
    assert s["cra"] == pytest.approx(1 / 2)  # style accuracy on the same prompts
    assert s["ua_paraphrase"] is None and s["n_forget_paraphrase"] == 0
    with pytest.raises(ObliviateError, match="no prompt has object 'sta'"):
        canvas.canvas_scores(rows, "sta", "object")
    with pytest.raises(ObliviateError, match="kind"):
        canvas.canvas_scores(rows, "star", "colour")


# ---- FID / KID ---------------------------------------------------------------------------------------------------


def test_fid_kid_self_near_zero_and_shift_larger():
    clf = TinyClassifier()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(64, 3, 16, 16, generator=g) * 0.6
    other = torch.rand(64, 3, 16, 16, generator=g) * 0.6
    shifted = (other + 0.4).clamp(0, 1)
    state = torch.random.get_rng_state()
    same = canvas.fid_kid(clf, images, images, batch_size=20)
    assert torch.equal(state, torch.random.get_rng_state())  # KID's subset sampling leaves the caller's RNG alone
    near = canvas.fid_kid(clf, other, images)
    far = canvas.fid_kid(clf, shifted, images)
    assert abs(same["fid"]) < 1e-6
    # KID's estimator is unbiased for independent sets; a set against itself gives a small negative number
    # (its cross term keeps the diagonal k(x, x) that the within-set terms drop), not exactly 0.
    assert abs(same["kid_mean"]) < 0.05 * far["kid_mean"]
    assert far["fid"] > 5 * near["fid"] > 0
    assert far["kid_mean"] > 5 * near["kid_mean"]
    assert canvas.fid_kid(clf, shifted, images) == far  # deterministic (KID subsets from a seeded generator)
    assert clf.training  # the caller's mode is restored


def test_fid_kid_runs_each_batch_through_the_classifier_once_with_the_same_values(monkeypatch):
    """FID and KID share the features of each batch; the values equal those of features computed anew per call."""
    clf = TinyClassifier()
    g = torch.Generator().manual_seed(2)
    images, reference = torch.rand(50, 3, 16, 16, generator=g), torch.rand(40, 3, 16, 16, generator=g) * 0.7
    calls = []
    original = clf.features
    monkeypatch.setattr(clf, "features", lambda x: calls.append(len(x)) or original(x))
    shared = canvas.fid_kid(clf, images, reference, batch_size=16)
    assert sorted(calls) == sorted([16, 16, 8, 16, 16, 16, 2])  # reference in 3 batches, images in 4: once each
    monkeypatch.setattr(canvas.ClassifierFeatures, "forward", canvas.ClassifierFeatures._features)
    assert canvas.fid_kid(clf, images, reference, batch_size=16) == shared


def test_kid_with_fewer_images_than_default_subset_size():
    clf = TinyClassifier()
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(12, 3, 16, 16, generator=g), torch.rand(7, 3, 16, 16, generator=g)
    out = canvas.fid_kid(clf, a, b, kid_subsets=5)  # subset size min(1000, 12, 7) = 7
    assert all(torch.isfinite(torch.tensor(v)) for v in out.values())
    with pytest.raises(ObliviateError, match="at least 2"):
        canvas.fid_kid(clf, a[:1], b)
    with pytest.raises(ObliviateError, match=r"\[0, 1\]"):
        canvas.fid_kid(clf, a * 2 - 1, b)


# ---- alignment ---------------------------------------------------------------------------------------------------

WORDS = ["a", "red", "blue", "circle", "square", "star", "in", "solid", "striped", "dotted", "style"]


@pytest.fixture(scope="module")
def tiny_clip():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "<bos>", "<eos>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="<bos>", eos_token="<eos>")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 16, "pad_token_id": 0, "bos_token_id": 2,
                     "eos_token_id": 3},
        vision_config={"image_size": 16, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 4},
        projection_dim=16)
    return CLIPModel(config).eval(), tokenizer


def test_alignment_in_range_and_equals_hand_cosine(tiny_clip):
    model, tokenizer = tiny_clip
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 16, 16, generator=g)
    texts = ["a red star in striped style", "a circle", "a blue square in dotted style"]
    scores = canvas.alignment_scores(model, tokenizer, images, texts, batch_size=2)
    assert scores.shape == (3,) and bool(((scores >= -1) & (scores <= 1)).all())
    # By hand for the short text (padded in its batch above, alone here): world normalisation (x - 0.5) / 0.5.
    with torch.no_grad():
        ids = tokenizer(texts[1], return_tensors="pt")
        img = canvas._embeds(model.get_image_features(pixel_values=(images[1:2] - 0.5) / 0.5))[0]
        txt = canvas._embeds(model.get_text_features(input_ids=ids["input_ids"],
                                                     attention_mask=ids["attention_mask"]))[0]
    assert scores[1].item() == pytest.approx((img @ txt / (img.norm() * txt.norm())).item(), abs=1e-5)
    # The normalisation is a parameter and matters.
    other = canvas.alignment_scores(model, tokenizer, images, texts, pixel_mean=0.0, pixel_std=1.0)
    assert not torch.allclose(other, scores, atol=1e-4)


def test_evaluate_samples_end_to_end(tiny_clip):
    model, tokenizer = tiny_clip
    clf = TinyClassifier()
    prompts = [Prompt(f"a red {o} in {s} style", o, s, "red") for o in OBJECTS for s in STYLES]
    prompts.append(Prompt("a red star in striped style", "star", "striped", "red", "paraphrase"))
    seeds = list(range(len(prompts)))
    g = torch.Generator().manual_seed(4)
    images = torch.rand(len(prompts), 3, 16, 16, generator=g)
    agg, rows = canvas.evaluate_samples(clf, model, tokenizer, images, prompts, seeds, "striped", "style",
                                        real_images=torch.rand(8, 3, 16, 16, generator=g), original_images=images)
    assert len(rows) == len(prompts) and rows[-1]["kind"] == "paraphrase" and rows[4]["seed"] == 4
    predicted = canvas.classify(clf, images)
    assert [r["pred_style"] for r in rows] == predicted["style"]
    # Aggregates are recomputable from the per-item rows.
    assert {k: agg[k] for k in ("ua", "ira", "cra", "ua_paraphrase")} == {
        k: canvas.canvas_scores(rows, "striped", "style")[k] for k in ("ua", "ira", "cra", "ua_paraphrase")}
    assert agg["alignment"] == pytest.approx(sum(r["alignment"] for r in rows) / len(rows))
    assert abs(agg["fid_original"]) < 1e-6 and agg["fid_real"] > agg["fid_original"]
    from obliviate.registry import METRICS, undeclared  # the metrics are declared once, with their family
    for key in ("ua", "ua_paraphrase", "ira", "cra", "fid_real", "fid_original", "kid_original", "alignment"):
        assert key in agg and METRICS[key].family == "t2i" and METRICS[key].better is not None, key
    assert undeclared(agg, "t2i") == []  # and every other key it writes too
    base, _ = canvas.evaluate_samples(clf, model, tokenizer, images, prompts, seeds)
    assert "ua" not in base and "fid_real" not in base and base["style_accuracy"] == agg["style_accuracy"]
    with pytest.raises(ObliviateError, match="no style class 'wavy'"):
        canvas.evaluate_samples(clf, model, tokenizer, images, prompts, seeds, "wavy", "style")


# ---- grids -------------------------------------------------------------------------------------------------------


def test_image_grid_size_pixels_and_data_uri():
    from PIL import Image

    from obliviate.bench.grids import GAP, grid_png_base64, image_grid

    g = torch.Generator().manual_seed(5)
    rows = [("original", torch.rand(4, 3, 8, 8, generator=g)), ("ESD", torch.rand(4, 3, 8, 8, generator=g))]
    rows[1][1][3] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)  # last cell pure red
    labels = [f"a red star in striped style / seed {i}" for i in range(4)]
    grid = image_grid(rows, labels, scale=3, label_width=60)
    cell = 8 * 3
    assert grid.width == 60 + 4 * (cell + GAP) + GAP
    header = grid.height - 2 * (cell + GAP) - GAP
    assert 12 <= header <= 4 * 12 + GAP  # wrapped column labels, at most 4 lines
    # The bottom-right cell is the last image, upscaled with NEAREST (every pixel exactly red).
    x0, y0 = grid.width - GAP - cell, grid.height - GAP - cell
    assert {c for _, c in grid.crop((x0, y0, x0 + cell, y0 + cell)).getcolors()} == {(255, 0, 0)}
    # The first cell of the first row is its first image, each source pixel a 3x3 block.
    x1, y1 = 60 + GAP, header + GAP
    first = (rows[0][1][0].clamp(0, 1) * 255).round().byte()
    assert grid.getpixel((x1 + 3 * 5 + 2, y1 + 3 * 2 + 1)) == tuple(first[:, 2, 5].tolist())
    # Something was written in the header and the label column (not all white).
    assert grid.crop((x1, 0, grid.width, header)).getextrema() != ((255, 255),) * 3
    assert grid.crop((0, y1, 60, grid.height)).getextrema() != ((255, 255),) * 3
    uri = grid_png_base64(rows, labels, scale=3, label_width=60)
    assert uri.startswith("data:image/png;base64,")
    png = base64.b64decode(uri.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).size == grid.size
    with pytest.raises(ValueError, match="column labels"):
        image_grid(rows, labels[:3])


def test_demo_report_has_one_section_per_erased_concept(tmp_path):
    """The demo page shows each canvas erasure's title, scorecard and grid (checked fast here; the slow demo test
    checks the same on the real run)."""
    from PIL import Image

    from obliviate.bench.report import write_demo_report

    Image.new("RGB", (8, 8), "red").save(tmp_path / "grid-striped.png")
    section = {"concept": "striped", "title": "Erasing 'striped' from the canvas pipeline", "grid": "grid-striped.png",
               "scorecard": {"original": {"ua": 0.1, "ira": 0.97}, "UCE": {"ua": 1.0, "ira": 0.95}},
               "notes": ["a <note>"]}
    page = write_demo_report(tmp_path, {"scorecard": {}, "t2i": [section]}, {}).read_text()
    assert "<h1>Erasing &#x27;striped&#x27; from the canvas pipeline</h1>" in page
    assert page.count("class='grid'") == 1 and "data:image/png;base64," in page
    assert "<td>UCE</td>" in page and "a &lt;note&gt;" in page
    assert page.endswith("</body></html>") and page.count("</body>") == 1
