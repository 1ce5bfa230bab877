"""DPO's reference log-probs come from the policy before its first step: one model in memory, never a second copy,
and the cached values equal those of a separately loaded reference model (full and LoRA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFS = ROOT / "data" / "chat" / "preferences.jsonl"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("mode", [{"full": True}, {"lora_r": 4}])
def test_dpo_loads_the_model_once_and_its_reference_equals_a_separate_one(mode, tiny_model_dir, tmp_path, monkeypatch):
    from lmforge.align import dpo
    from lmforge.align.chat_data import ChatTokenizer, pad_id_of
    from lmforge.model.hf import load_model

    loads = []

    def counted(folder, *a, **k):
        loads.append(folder)
        return load_model(folder, *a, **k)

    monkeypatch.setattr(dpo, "load_model", counted)
    cfg = dpo.Config(model=str(tiny_model_dir), data=str(PREFS), seq_len=256, batch_size=4, max_steps=2, lr=1e-3,
                     warmup_steps=0, val_fraction=0.2, threads=1, seed=0, **mode)
    m = dpo.run(cfg, tmp_path / "dpo")
    assert m.status == "done" and len(loads) == 1
    cached = json.loads((tmp_path / "dpo" / dpo.REF_CACHE).read_text())["logps"]

    tok = ChatTokenizer.from_folder(tiny_model_dir)
    pairs = dpo.encode_pairs(tok, PREFS, 256)
    pad = pad_id_of(tiny_model_dir, tok)
    separate = dpo.reference_logps(load_model(tiny_model_dir), pairs, pad)
    for k in (0, 1):  # chosen, rejected (the cache holds the train pairs, then the held-out ones)
        assert sorted(x[k] for x in cached) == pytest.approx(sorted(x[k] for x in separate), abs=1e-4)
