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
