"""Memory-lean log-probs (only target tokens meet the output head, in chunks) give what the full-logits
implementation gave: DPO's summed log-probs, its loss and held-out metrics, SFT's loss, and their gradients.

Tolerances follow from the computation: a token's log-prob is ``logit - logsumexp(logits)`` in float32, where each
logit is a dot product of ``hidden_size`` terms; the two implementations may sum those terms in another order (other
matmul shapes), so a token differs by at most about ``eps * (hidden_size + log2(vocab)) * max|logit|`` and a sequence
by ``n_tokens`` times that.  The losses are 1-Lipschitz in their beta-scaled margins."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.align import dpo, sft
from lmforge.align.chat_data import IGNORE, ChatTokenizer
from lmforge.model.hf import load_model

ROOT = Path(__file__).resolve().parents[1]
PREFS = ROOT / "data" / "chat" / "preferences.jsonl"
EPS = torch.finfo(torch.float32).eps


def full_logits_logps(model, examples, pad_id):
    """The previous implementation of ``dpo.sequence_logps``: [N, T, vocab] logits, then cross-entropy."""
    batch = sft.collate(examples, [[i] for i in range(len(examples))], pad_id, packed=False)
    logits = model(batch.input_ids)
    mask = batch.labels != IGNORE
    logp = -F.cross_entropy(logits.float().transpose(1, 2), batch.labels.clamp(min=0), reduction="none")
    return (logp * mask).sum(-1), mask.sum(-1), logits.detach().abs().max()


def seq_tolerance(model, n_tokens, max_logit):
    cfg = model.config
    return float(n_tokens.max()) * EPS * (cfg.hidden_size + math.log2(cfg.vocab_size)) * float(max_logit)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    tok = ChatTokenizer.from_folder(tiny_model_dir)
    pairs = dpo.encode_pairs(tok, PREFS, 256)[:12]
    policy, reference = load_model(tiny_model_dir), load_model(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():  # a reference that differs from the policy, so margins are not 0
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, reference, pairs, policy.config.pad_token_id


def test_dpo_log_probs_loss_and_gradients_equal_the_full_logits_implementation(setup):
    model, reference, pairs, pad = setup
    examples = [c for c, _ in pairs[:4]] + [r for _, r in pairs[:4]]
    old, n_old, max_logit = full_logits_logps(model, examples, pad)
    new, n_new = dpo.sequence_logps(model, examples, pad)
    tol = seq_tolerance(model, n_new, max_logit)
    assert torch.equal(n_old, n_new)
    torch.testing.assert_close(new, old, atol=tol, rtol=0)
    with torch.no_grad():
        ref, _, _ = full_logits_logps(reference, examples, pad)
    beta = 0.1
    loss_old, st_old = dpo.preference_loss("sigmoid", beta, old[:4], old[4:], n_old[:4], n_old[4:], ref[:4], ref[4:])
    loss_new, st_new = dpo.preference_loss("sigmoid", beta, new[:4], new[4:], n_new[:4], n_new[4:], ref[:4], ref[4:])
    assert float(loss_new.detach()) == pytest.approx(float(loss_old.detach()), abs=2 * beta * tol)
    grads = []
    for loss in (loss_old, loss_new):
        model.zero_grad()
        loss.backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():  # the gradients are sums of the same per-token terms
        torch.testing.assert_close(grads[1][name], g, atol=1e-5 * float(g.abs().max()) + 1e-8, rtol=1e-4)
    model.zero_grad()


def test_dpo_held_out_metrics_equal_the_full_logits_implementation(setup):
    model, reference, pairs, pad = setup
    with torch.no_grad():
        ref_lp, _, _ = full_logits_logps(reference, [c for c, _ in pairs] + [r for _, r in pairs], pad)
        pol_lp, n, max_logit = full_logits_logps(model, [c for c, _ in pairs] + [r for _, r in pairs], pad)
    N = len(pairs)
    ref = list(zip(ref_lp[:N].tolist(), ref_lp[N:].tolist()))
    tol = seq_tolerance(model, n, max_logit)
    for kind, beta in (("sigmoid", 0.1), ("ipo", 0.1), ("simpo", 2.0)):
        got = dpo.preference_metrics(model, pairs, pad, ref, kind, beta)
        d = lambda x: x.double()  # noqa: E731
        loss, want = dpo.preference_loss(kind, beta, d(pol_lp[:N]), d(pol_lp[N:]), d(n[:N]), d(n[N:]),
                                         d(ref_lp[:N]), d(ref_lp[N:]))
        want["loss"] = float(loss)
        scale = 2 * beta * (1 if kind == "sigmoid" else 1 / float(n.min()))  # per-token means for ipo/simpo
        for key in ("reward_chosen", "reward_rejected", "reward_margin"):
            assert got[key] == pytest.approx(want[key], abs=scale * tol), (kind, key)
        if kind == "ipo":  # (h - 1/(2 beta))^2 moves by at most 2 |h - 1/(2 beta)| dh + dh^2
            dh = 2 * tol / float(n.min())
            h = (d(pol_lp[:N]) - d(ref_lp[:N])) / d(n[:N]) - (d(pol_lp[N:]) - d(ref_lp[N:])) / d(n[N:])
            bound = float(2 * (h - 1 / (2 * beta)).abs().max() * dh + dh ** 2)
        else:  # -log sigmoid is 1-Lipschitz in the beta-scaled margin
            bound = scale * tol
        assert got["loss"] == pytest.approx(want["loss"], abs=bound), kind
        assert got["logp_margin"] == pytest.approx(want["logp_margin"], abs=2 * tol)
        assert got["reward_accuracy"] == want["reward_accuracy"]


def test_sft_chunked_loss_and_gradients_equal_full_logits(setup):
    model, _, pairs, pad = setup
    examples = [c for c, _ in pairs[:6]]
    batch = sft.collate(examples, [[0, 1, 2], [3, 4, 5]], pad, packed=True, seq_len=256)
    full = sft.token_losses(model, batch).sum()
    model.zero_grad()
    full.backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    fused = sft.target_loss_sum(model, sft.head_weight(model), batch)
    fused.backward()
    max_logit = float(model(batch.input_ids).detach().abs().max())
    assert float(fused) == pytest.approx(float(full), abs=batch.n_targets * EPS * (model.config.hidden_size + 10)
                                         * max_logit)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_full[name], atol=1e-5 * float(g_full[name].abs().max()) + 1e-8,
                                   rtol=1e-4)
    model.zero_grad()


def test_training_never_materialises_full_vocab_logits(tiny_model_dir, tmp_path, monkeypatch):
    """SFT (full and LoRA) and DPO train and measure held-out metrics without ever running the output head over
    every position: the head's forward is forbidden here; each run records its peak RSS."""

    def no_head(module, args):
        raise AssertionError("the output head ran over all positions: full-vocab logits were materialised")

    def guarded(folder, *a, **k):
        model = load_model(folder, *a, **k)
        model.lm_head.register_forward_pre_hook(no_head)
        return model

    monkeypatch.setattr(sft, "load_model", guarded)
    monkeypatch.setattr(dpo, "load_model", guarded)
    chat = ROOT / "data" / "chat" / "chatterbot_en.jsonl"
    common = dict(model=str(tiny_model_dir), seq_len=256, batch_size=2, max_steps=2, eval_every=1, on_error="skip",
                  threads=1)
    for kw in (dict(full=True), dict(lora_r=2)):
        m = sft.run(sft.Config(data=str(chat), val_fraction=0.01, **common, **kw), tmp_path / f"sft{len(kw)}{kw}")
        assert m.metrics["final_val_loss"] > 0 and m.metrics["peak_rss_mb"] > 0
    m = dpo.run(dpo.Config(data=str(PREFS), val_fraction=0.2, **common), tmp_path / "dpo")
    assert m.metrics["val_after"]["loss"] > 0 and m.metrics["peak_rss_mb"] > 0


def test_activation_checkpointing_trains_exactly_like_without(tiny_model_dir, tmp_path):
    import json

    chat = ROOT / "data" / "chat" / "chatterbot_en.jsonl"
    common = dict(model=str(tiny_model_dir), data=str(chat), seq_len=256, batch_size=2, max_steps=2, eval_every=2,
                  on_error="skip", val_fraction=0.01, threads=1, lora_r=2, seed=0)
    logs = []
    for ac in (False, True):
        out = tmp_path / f"ac{ac}"
        sft.run(sft.Config(activation_checkpointing=ac, **common), out)
        logs.append([{k: r[k] for k in ("loss", "grad_norm", "val_loss") if k in r}
                     for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())])
    assert logs[0] == logs[1]  # recomputation repeats the same float operations


def test_lora_checkpoints_activations_by_default_full_does_not(tiny_model_dir, tmp_path):
    chat = ROOT / "data" / "chat" / "chatterbot_en.jsonl"
    common = dict(model=str(tiny_model_dir), data=str(chat), seq_len=256, batch_size=2, max_steps=1, eval_every=1,
                  on_error="skip", val_fraction=0.01, threads=1, seed=0)
    lora = sft.run(sft.Config(lora_r=2, **common), tmp_path / "lora").metrics
    full = sft.run(sft.Config(full=True, **common), tmp_path / "full").metrics
    off = sft.run(sft.Config(lora_r=2, activation_checkpointing=False, **common), tmp_path / "off").metrics
    assert (lora["activation_checkpointing"], full["activation_checkpointing"], off["activation_checkpointing"]) == \
        (True, False, False)
