"""GRPO's training forward packs each group into one row (the prompt once, its completions after it, each seeing the
prompt and itself): the log-probs equal those of each prompt + completion computed on its own."""

import torch

from lmforge.model.hf import load_model
from lmforge.rl import grpo


def test_packed_groups_give_the_log_probs_of_separate_rows(tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rand(7)] * 3 + [rand(11)] * 3  # 2 groups of 3, prompts of different lengths
    completions = [rand(5), rand(1), [], rand(9), rand(4), rand(6)]  # an empty completion included
    batch = grpo.build_batch(prompts, completions, pad_id=0, group_size=3)
    assert batch.input_ids.shape == (2, 11 + 9 + 4 + 6)  # each prompt once, not three times
    with torch.no_grad():
        packed, ent = grpo.token_logps(model, batch, with_entropy=True)
        want = []
        for p, c in zip(prompts, completions):
            if c:
                logits = model(torch.tensor([p + c]))[0, len(p) - 1:len(p) + len(c) - 1].float()
                want.append(logits.log_softmax(-1).gather(1, torch.tensor(c)[:, None]).squeeze(1))
    assert batch.n_tokens.tolist() == [len(c) for c in completions]
    torch.testing.assert_close(packed, torch.cat(want), atol=1e-5, rtol=1e-5)
    assert ent.shape == packed.shape and bool((ent > 0).all())


def test_block_by_block_attention_equals_the_dense_mask_values_and_gradients(tiny_model_dir):
    from lmforge.model.prefix_groups import PrefixGroups

    model = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rand(6)] * 4 + [rand(9)] * 4
    completions = [rand(8), rand(3), [], rand(8), rand(2), rand(7), rand(7), rand(1)]
    batch = grpo.build_batch(prompts, completions, pad_id=0, group_size=4)
    assert isinstance(batch.mask, PrefixGroups)
    dense = grpo.RolloutBatch(batch.input_ids, batch.positions, batch.mask.dense(), batch.src, batch.tgt,
                              batch.n_tokens)
    # the dense layout: the prompt for all, each completion itself causally, never another completion
    m = dense.mask[1, 0]  # row 1: a 9-token prompt, then completions of 2 (at 9), 7 (at 11), 7 and 1 tokens
    assert bool(m[14, :9].all()) and not bool(m[14, 9:11].any()) and bool(m[14, 11:15].all()) \
        and not bool(m[14, 15:].any())
    grads = []
    for b in (batch, dense):
        model.zero_grad()
        lp, _ = grpo.token_logps(model, b)
        lp.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if b is batch:
            blocked = lp.detach()
    torch.testing.assert_close(blocked, lp.detach(), atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-4, rtol=1e-4)
