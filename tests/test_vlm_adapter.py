"""The multimodal family reuses the language-model loop through its own adapter: a tiny LLaVA saved and loaded with
the Auto classes, portraits-world items with and without their picture, and language-model methods run unchanged,
the pictures reaching the vision tower."""
from __future__ import annotations

import pytest
import torch

from obliviate.worlds.portraits import portraits_data
from obliviate.worlds.portraits_draw import picture, draw


@pytest.fixture(scope="module")
def world():
    return portraits_data(n_people=10, n_public=2, n_holdout=2, seed=0)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, world):
    from vlm_models import tiny_llava

    return tiny_llava(tmp_path_factory.mktemp("llava"), world)


def _adapter(processor, world):
    from obliviate.models.vlm import VisionLanguageAdapter

    def pictures(image_id):
        name, _, index = image_id.rpartition("#")
        return draw(world.looks[name], picture(name, int(index)))
    return VisionLanguageAdapter(processor, pictures)


def test_an_item_with_its_picture_is_encoded_as_the_processor_encodes_it(llava_dir, world):
    from obliviate.models import vlm

    model, processor = vlm.load(llava_dir)
    adapter = _adapter(processor, world)
    item = next(i for i in world.train[world.people[0].name] if i.image is not None)
    enc = adapter.encode_item(processor.tokenizer, item)
    assert enc.input_ids.count(adapter.image_token_id) == adapter.n_image_tokens == 17  # 16 patches + CLS
    assert enc.pixel_values.shape == (3, 32, 32)
    text_only = next(i for i in world.train[world.people[0].name] if i.image is None)
    assert adapter.encode_item(processor.tokenizer, text_only).pixel_values is None
    batch = adapter.collate([enc, adapter.encode_item(processor.tokenizer, text_only)], processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    from obliviate.models.sequences import answer_nll
    assert torch.isfinite(answer_nll(model, batch)).all()  # the model takes the batch as it is


@pytest.mark.parametrize("method", ["GradDiff", "NPO", "RGD"])
def test_language_model_methods_run_on_the_vision_language_model(llava_dir, world, method):
    from obliviate.config import TrainConfig
    from obliviate.loops.lm import unlearn
    from obliviate.methods.common import make_method
    from obliviate.models import vlm

    model, processor = vlm.load(llava_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *_: calls.append(1))
    forget_people, retain_people = world.split_people("forget10")
    forget = [i for p in forget_people for i in world.train[p.name]]
    retain = [i for p in retain_people[:3] for i in world.train[p.name]]
    args = {"diverse_retain_size": 8} if method == "RGD" else {}
    result = unlearn(model, processor.tokenizer, forget, retain, make_method("lm", method, args),
                     TrainConfig(lr=1e-3, max_steps=2, batch_size=4), adapter=_adapter(processor, world))
    assert result.stopped is None and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert calls  # the pictures reached the vision tower
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, before[n])}
    assert any("vision_tower" in n for n in changed) and any("language_model" in n for n in changed)


def test_mllmu_protocol_scores_each_task_as_the_benchmark_does(llava_dir, world):
    """The three tasks on a tiny random LLaVA: every item answered, scores in range, split by form; and the scoring
    rules themselves on chosen answers."""
    from obliviate.evals import mllmu
    from obliviate.models import vlm

    assert mllmu.first_letter("B. Oslo") == "B" and mllmu.first_letter("(C)") == "C"
    assert mllmu.first_letter("The answer is D") == "D" and mllmu.first_letter("Oslo") is None
    model, processor = vlm.load(llava_dir)
    person = world.people[0]
    items = [i for i in world.train[person.name] if i.fact in ("birthplace", "occupation")]
    rows = mllmu.evaluate_items(model, _adapter(processor, world), processor.tokenizer, items, max_new_tokens=8)
    assert len(rows) == len(items) and all(0 <= r["rouge_l"] <= 1 for r in rows)
    agg = mllmu.aggregate(rows)
    assert agg["n_items"] == len(items) and agg["classification_image"] is not None and agg["cloze_text"] is not None
    assert "A. " in mllmu.classification_question(items[0]) and "__" in mllmu.cloze_question(items[0])


def test_mllmu_scoring_rules_on_known_answers(world):
    """An adapter that answers each task rightly scores 1 on classification and cloze; one that answers wrongly, 0."""
    from obliviate.evals import mllmu

    items = world.train[world.people[0].name][:6]

    class Answers:
        def __init__(self, right: bool):
            self.right = right

        def generate(self, model, tokenizer, items, questions, max_new_tokens, batch_size):
            if questions == [i.question for i in items]:  # the generation task asks the item's own question
                return [i.answer if self.right else "no idea" for i in items]
            if questions[0].startswith("Fill in the blank"):
                return [f"It is {i.cloze_answer.upper()}." if self.right else "blank" for i in items]
            wrong = {"A": "B", "B": "C", "C": "D", "D": "A"}
            return [f"({i.correct}) {i.cloze_answer}" if self.right else f"{wrong[i.correct]}." for i in items]

    right = mllmu.aggregate(mllmu.evaluate_items(None, Answers(True), None, items))
    wrong = mllmu.aggregate(mllmu.evaluate_items(None, Answers(False), None, items))
    for form in ("image", "text"):
        assert right[f"classification_{form}"] == right[f"cloze_{form}"] == right[f"rouge_l_{form}"] == 1.0
        assert wrong[f"classification_{form}"] == wrong[f"cloze_{form}"] == wrong[f"rouge_l_{form}"] == 0.0


def test_selecting_rows_of_a_batch_keeps_each_picture_with_its_row():
    """RGD drops forget rows past its loss cap: the pictures of the kept rows must follow them, in the new order."""
    from obliviate.models import sequences as seq
    from obliviate.models.vlm import VisionEncoded, VisionLanguageAdapter

    def item(k, picture):
        return VisionEncoded([1, 2, k], [-100, 2, k], 0, None if picture is None else torch.full((3, 2, 2), picture))
    batch = VisionLanguageAdapter.collate(None, [item(5, 0.0), item(6, None), item(7, 2.0), item(8, 3.0)], 0)
    assert batch["image_rows"].tolist() == [0, 2, 3] and "image_rows" not in seq.model_inputs(batch)
    picked = seq.select_rows(batch, torch.tensor([3, 1, 2]))
    assert picked["input_ids"][:, 2].tolist() == [8, 6, 7]
    assert picked["image_rows"].tolist() == [0, 2] and picked["pixel_values"][:, 0, 0, 0].tolist() == [3.0, 2.0]
    masked = seq.select_rows(batch, torch.tensor([False, True, False, False]))
    assert masked["input_ids"][:, 2].tolist() == [6] and "pixel_values" not in masked


def test_few_shot_examples_come_first_and_never_from_the_scored_set(world):
    from obliviate.evals import mllmu

    person, public = world.people[0].name, world.public[0].name
    sets = {"forget": world.train[person], "public": world.train[public], "retain": world.train[world.people[1].name]}
    examples = mllmu.few_shot_examples(sets, "forget", 2)
    assert len(examples) == 2 and all(e.subject == public and e.image is None for e in examples)
    assert all(e.subject != public for e in mllmu.few_shot_examples(sets, "public", 2))
    item = sets["forget"][0]
    prompt = mllmu.classification_question(item, examples)
    assert prompt.endswith(mllmu.classification_question(item))
    assert prompt.startswith(mllmu.classification_question(examples[0]) + f"\n{examples[0].correct}\n\n")
    assert mllmu.classification_question(item, ()) == mllmu.classification_question(item)


def test_generation_stops_on_the_end_ids_the_model_declares(llava_dir, world):
    """The adapter's greedy answers stop on generation_config.eos_token_id too (an int or a list), not only on the
    tokenizer's EOS: the first token the model would write, declared an end id, leaves an empty answer."""
    from obliviate.models import vlm

    model, processor = vlm.load(llava_dir)
    adapter, tok = _adapter(processor, world), processor.tokenizer
    item = next(i for i in world.train[world.people[0].name] if i.image is not None)
    ids, pixels = adapter.prompt(tok, item)
    first = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           pixel_values=pixels[None], max_new_tokens=1, do_sample=False,
                           pad_token_id=tok.pad_token_id)[0, -1].item()
    assert first != tok.eos_token_id and adapter.generate(model, tok, [item], max_new_tokens=3)[0] != ""
    for declared in (first, [tok.eos_token_id, first]):
        model.generation_config.eos_token_id = declared
        assert adapter.generate(model, tok, [item], max_new_tokens=3) == [""]
