import torch

from obliviate.models import causal_lm as lm
from obliviate.models import sequences
from conftest import tiny_items


def test_prompt_is_exact_prefix_and_only_answer_tokens_scored(tiny_lm):
    model, tok = tiny_lm
    for item in tiny_items():
        enc = lm.encode_qa(tok, item.question, item.answer)
        prompt = lm.encode_prompt(tok, lm.PROMPT_TEMPLATE.format(question=item.question))
        assert enc.input_ids[:len(prompt)] == prompt
        # With this template and a byte-level BPE the joint tokenisation equals prompt + answer tokens.
        joint = tok(lm.PROMPT_TEMPLATE.format(question=item.question) + " " + item.answer)["input_ids"]
        assert joint == enc.input_ids[:-1]  # all but EOS
        scored = [t for t, l in zip(enc.input_ids, enc.labels) if l != lm.IGNORE]
        assert tok.decode(scored, skip_special_tokens=True).strip() == item.answer


def test_padding_does_not_change_answer_logprob(tiny_lm):
    model, tok = tiny_lm
    items = tiny_items()
    encs = [lm.encode_qa(tok, i.question, i.answer) for i in items]
    batch = lm.collate(encs, tok.pad_token_id)
    with torch.no_grad():
        together, _ = sequences.sequence_logprob(model, batch)
        alone = torch.stack([sequences.sequence_logprob(model, lm.collate([e], tok.pad_token_id))[0][0] for e in encs])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_generate_is_batched_and_left_padded(tiny_lm):
    model, tok = tiny_lm
    prompts = [lm.encode_prompt(tok, lm.PROMPT_TEMPLATE.format(question=i.question)) for i in tiny_items()]
    batched = lm.generate(model, tok, prompts, max_new_tokens=5)
    single = [lm.generate(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single
