"""The slot layout helpers, on small hand-checkable tensors."""

import torch

from megatron_latent.models import slots


def test_interleave_and_take_slot_are_inverse():
    L, b, h = 3, 2, 4
    stages = [torch.full((L, b, h), float(10 * k)) + torch.arange(L)[:, None, None] for k in range(3)]
    x = slots.interleave(stages)
    assert x.shape == (9, b, h)
    # index i * num_slots + k holds slot k of position i
    assert [x[i, 0, 0].item() for i in range(9)] == [0, 10, 20, 1, 11, 21, 2, 12, 22]
    for k in range(3):
        assert torch.equal(slots.take_slot(x, k, 3), stages[k])
    assert all(torch.equal(a, b) for a, b in zip(slots.split_slots(x, 3), stages))
    assert slots.interleave([stages[0]]) is stages[0]


def test_slot_position_ids_repeat_each_position():
    pos = torch.tensor([[0, 1, 2], [0, 1, 0]])
    assert slots.slot_position_ids(pos, 2).tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 0, 0]]


def test_slot_mask_of_causal_is_causal_over_interleaved_sequence():
    L, n = 4, 3
    expanded = slots.slot_attention_mask(slots.causal_mask(L), n)
    assert torch.equal(expanded, slots.causal_mask(L * n))
    assert slots.slot_attention_mask(None, n) is None


def test_slot_mask_keeps_document_resets():
    # Two documents: positions 0-1 and 2-3. Token 2 must not see tokens 0-1.
    L, n = 4, 2
    doc = torch.tensor([0, 0, 1, 1])
    token_mask = (slots.causal_mask(L)[0, 0] | (doc[:, None] != doc[None, :]))[None, None]
    m = slots.slot_attention_mask(token_mask, n)[0, 0]
    allowed = ~m
    # slot (2, 0) at index 4 sees only itself; slot (2, 1) at index 5 sees indices 4 and 5
    assert allowed[4].nonzero().flatten().tolist() == [4]
    assert allowed[5].nonzero().flatten().tolist() == [4, 5]
    # slot (1, 1) at index 3 sees the whole first document
    assert allowed[3].nonzero().flatten().tolist() == [0, 1, 2, 3]
