import torch
from transformers import AutoModelForCausalLM

from deltatune.losses import causal_lm_loss, classification_loss


def test_causal_lm_loss_matches_transformers(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    ids = torch.randint(10, 40, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    labels[2, 9:] = -100  # padding
    out = model(input_ids=ids, labels=labels)
    total, count = causal_lm_loss(out.logits, labels)
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total / count, out.loss)


def test_classification_loss_is_summed_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    total, count = classification_loss(logits, torch.tensor([0, 0]))
    expected = -torch.log_softmax(logits, -1)[[0, 1], [0, 0]].sum()
    assert count == 2
    torch.testing.assert_close(total, expected)
