"""Pretraining features on real text: schedules, MFU + TensorBoard logging, overwrite refusal, resume with a changed
config, run comparison plots and token mixtures (with a curriculum)."""

import json
import math
from pathlib import Path

import numpy as np
import pydoc_data.topics
import pytest

from lmforge.artifacts import read_manifest
from lmforge.config import ConfigError
from lmforge.tokenizer import stage as tok_stage
from lmforge.tokenizer.shards import load_sources, read_index
from lmforge.train import pretrain
from lmforge.train.batches import mixture_weights_at, sample_mixture_batch
from lmforge.train.compare import compare_runs
from lmforge.train.flops import cpu_peak_flops, flops_per_token
from lmforge.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, docs: list[tuple[str, str]]) -> Path:
    with open(path, "w") as f:
        for i, text in docs:
            f.write(json.dumps({"id": i, "text": text, "meta": {"source": path.stem}}) + "\n")
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    pydoc = write_jsonl(d / "pydoc.jsonl", sorted(pydoc_data.topics.topics.items()))
    lines = (REPO / "data/demo/books/shakespeare-macbeth.txt").read_text(encoding="utf-8").splitlines()
    scenes = ["\n".join(lines[i:i + 40]) for i in range(0, len(lines), 40)]
    macbeth = write_jsonl(d / "macbeth.jsonl", [(f"macbeth-{n}", t) for n, t in enumerate(scenes) if t.strip()])
    return pydoc, macbeth


@pytest.fixture(scope="module")
def tokenized(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok_stage.run(tok_stage.Config(data=str(sources[0]), vocab_size=600, val_fraction=0.1), out)
    return out


@pytest.fixture(scope="module")
def mixed(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("mix")
    tok_stage.run(tok_stage.Config(data=[str(s) for s in sources], weights=[3, 1], vocab_size=600,
                                   val_fraction=0.1), out)
    return out


def tiny(tokenized, **kw):
    base = dict(tokenizer=str(tokenized), hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, seq_len=32,
                batch_size=4, max_steps=8, warmup_steps=2, eval_every=4, eval_windows=2, checkpoint_every=4, lr=1e-2)
    base.update(kw)
    return pretrain.Config(**base)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


# -- schedules ----------------------------------------------------------------------------------------------------------

def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warmup
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


def test_wsd_schedule_has_a_plateau_and_a_linear_decay():
    lrs = [lr_at(s, 2.0, 10, 100, 0.1, schedule="wsd", decay_fraction=0.2) for s in range(101)]
    assert lrs[4] == pytest.approx(1.0)  # warmup
    assert set(lrs[9:80]) == {2.0}  # stable
    assert lrs[90] == pytest.approx(2.0 * (1 - 0.9 * 0.5))  # halfway through the decay
    assert lrs[100] == pytest.approx(0.2)
    diffs = np.diff(lrs[80:100])
    assert np.allclose(diffs, diffs[0])  # linear
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(50, 1.0, 10, 100, schedule="step")  # type: ignore[arg-type]


def test_wsd_is_used_by_pretrain(tokenized, tmp_path):
    pretrain.run(tiny(tokenized, schedule="wsd", decay_fraction=0.25, warmup_steps=2), tmp_path / "wsd")
    lrs = [r["lr"] for r in records(tmp_path / "wsd")]
    assert lrs[1:7] == [1e-2] * 6 and lrs[7] == pytest.approx(1e-2 * (1 - 0.9 * 0.5))


# -- logging ------------------------------------------------------------------------------------------------------------

def test_metrics_have_mfu_and_tensorboard_events(tokenized, tmp_path):
    m = pretrain.run(tiny(tokenized), tmp_path / "run")
    recs = records(tmp_path / "run")
    assert all(0 < r["mfu"] < 1 for r in recs)
    assert 0 < m.metrics["mfu"] < 1 and m.metrics["device"].startswith("CPU")
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in acc.Scalars("val/loss")] == [4, 8]


def test_flops_per_token_and_cpu_peak():
    from lmforge.model.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    # tied: every parameter is a matmul weight (the head) except the norms
    assert flops_per_token(cfg, 128) == 6 * cfg.num_params() + 12 * 2 * 64 * 128
    assert cpu_peak_flops("float32", threads=2) == pytest.approx(2 * cpu_peak_flops("float32", threads=1))
    assert cpu_peak_flops("bfloat16") >= cpu_peak_flops("float32") > 0


def test_compare_overlays_runs(tokenized, tmp_path):
    pretrain.run(tiny(tokenized), tmp_path / "a")
    pretrain.run(tiny(tokenized, lr=3e-3), tmp_path / "b")
    png = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        compare_runs([tmp_path / "a", tmp_path / "nothing"], tmp_path / "x.png")


# -- overwrite and resume -----------------------------------------------------------------------------------------------

def test_finished_run_is_not_overwritten_by_another_config(tokenized, tmp_path):
    out = tmp_path / "run"
    first = pretrain.run(tiny(tokenized), out)
    with pytest.raises(ConfigError, match=r"lr: 0\.01 → 0\.005.*--force"):
        pretrain.run(tiny(tokenized, lr=5e-3), out)
    assert read_manifest(out).run_id == first.run_id  # untouched
    again = pretrain.run(tiny(tokenized, lr=5e-3), out, force=True)
    assert again.run_id != first.run_id and again.config["lr"] == 5e-3


def crash_at_step_5(tokenized, out, monkeypatch):
    """Run ``tiny`` into ``out`` and kill it at step 5 (after the step-4 checkpoint)."""
    real = pretrain.sample_batch

    def crash(tokens, batch_size, seq_len, seed, step):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")
        return real(tokens, batch_size, seq_len, seed, step)

    monkeypatch.setattr(pretrain, "sample_batch", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain.run(tiny(tokenized), out)
    monkeypatch.setattr(pretrain, "sample_batch", real)


def test_resume_with_a_changed_config_warns_which_fields_changed(tokenized, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    crash_at_step_5(tokenized, out, monkeypatch)
    capsys.readouterr()
    m = pretrain.run(tiny(tokenized, max_steps=10), out)  # extend the run: resumes from the step-4 checkpoint
    text = " ".join(capsys.readouterr().err.split())
    assert "resuming with a changed config: max_steps: 8 → 10" in text and "resumed from" in text
    assert [r["step"] for r in records(out)] == list(range(1, 11)) and m.metrics["steps"] == 10


def test_changed_model_shape_starts_afresh(tokenized, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    crash_at_step_5(tokenized, out, monkeypatch)
    capsys.readouterr()
    pretrain.run(tiny(tokenized, hidden_size=48), out)
    text = " ".join(capsys.readouterr().err.split())
    assert "starting afresh" in text and "resumed from" not in text


# -- mixtures -----------------------------------------------------------------------------------------------------------

def test_tokenizer_packs_each_source_with_its_weight(mixed):
    index = read_index(mixed / "tokens")
    assert [s["weight"] for s in index["sources"]] == [0.75, 0.25]
    for split in ("train", "val"):
        assert index["splits"][split]["tokens"] == sum(s["splits"][split]["tokens"] for s in index["sources"])
    srcs = load_sources(mixed / "tokens", "train")
    eos = index["eos_id"]
    assert [int((t == eos).sum()) for _, _, t in srcs] == [s["splits"]["train"]["docs"] for s in index["sources"]]


def test_mixture_sampling_matches_target_weights(mixed):
    tokens = [t for _, _, t in load_sources(mixed / "tokens", "train")]
    w = np.array([0.75, 0.25])
    which = np.concatenate([sample_mixture_batch(tokens, w, 64, 16, seed=1, step=s)[2] for s in range(40)])
    assert abs((which == 1).mean() - 0.25) < 0.03  # 2,560 draws: 3 sigma is ~0.026
    x1, _, _ = sample_mixture_batch(tokens, w, 8, 16, seed=1, step=7)
    x2, _, _ = sample_mixture_batch(tokens, w, 8, 16, seed=1, step=7)
    assert (x1 == x2).all()  # a pure function of (seed, step)


def test_curriculum_moves_the_weights_linearly(mixed):
    assert np.allclose(mixture_weights_at(0, 100, [1, 0], [0, 1]), [1, 0])
    assert np.allclose(mixture_weights_at(25, 100, [1, 0], [0, 1]), [0.75, 0.25])
    assert np.allclose(mixture_weights_at(100, 100, [1, 0], [0, 1]), [0, 1])
    assert np.allclose(mixture_weights_at(30, 100, [3, 1]), [0.75, 0.25])
    tokens = [t for _, _, t in load_sources(mixed / "tokens", "train")]
    early = np.concatenate([sample_mixture_batch(tokens, mixture_weights_at(s, 100, [0.9, 0.1], [0.1, 0.9]),
                                                 32, 16, 3, s)[2] for s in range(0, 10)])
    late = np.concatenate([sample_mixture_batch(tokens, mixture_weights_at(s, 100, [0.9, 0.1], [0.1, 0.9]),
                                                32, 16, 3, s)[2] for s in range(90, 100)])
    assert (early == 1).mean() < 0.25 and (late == 1).mean() > 0.75


def test_pretrain_on_a_mixture_with_a_curriculum(mixed, tmp_path):
    m = pretrain.run(tiny(mixed, mixture_weights_end=[0.2, 0.8]), tmp_path / "mix")
    assert m.status == "done" and m.metrics["steps"] == 8
    with pytest.raises(ConfigError, match="mixture_weights: 3 weights given but .* holds 2 sources"):
        pretrain.run(tiny(mixed, mixture_weights=[1, 1, 1]), tmp_path / "bad")


def test_tokenizer_config_errors_name_the_field(sources):
    with pytest.raises(Exception, match="weights"):
        tok_stage.Config(data=[str(s) for s in sources], weights=[1.0])
