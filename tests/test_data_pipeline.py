"""The data pipeline as a list of steps: the registry, the flat flags as a preset, clear errors, and the same output
from the flat flags and from the list they expand to."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from lmforge.config import ConfigError, validate
from lmforge.data.io import iter_documents
from lmforge.data.pipeline import STEPS, phases, preset_pipeline, resolve
from lmforge.data.stage import Config, run, step_names

from test_data import DAODEJING, DEMO, check_conservation, small_inputs

ROOT = Path(__file__).resolve().parents[1]
EVERY_SWITCH = dict(line_junk=True, c4_quality=True, fineweb_quality=True, pii=True, domains=True, toxicity=True,
                    line_dedup=True, line_dedup_max_docs=2, minhash=True, minhash_threshold=0.5, zh_convert="t2s",
                    top_fraction=0.8, select_score="lang_score", mix_by="lang", mix_targets={"en": 0.7, "*": 0.3})


def _lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "LMFORGE_HOME": str(cwd / "home")}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_every_registered_step_has_the_version_of_its_class():
    from lmforge.data.global_pass import DecidedDedup
    from lmforge.data.linededup import RepeatedLineRemoval
    from lmforge.data.minhash import NearDedup
    from lmforge.data.quality import QualityScore
    from lmforge.data.steps import ExactDedup

    cache: dict = {}
    corpus = {"line_dedup": RepeatedLineRemoval.name, "exact_dedup": ExactDedup.name, "minhash_dedup": NearDedup.name,
              "quality": QualityScore.name, "select": "select_v1", "mix": "mix_v1"}
    assert DecidedDedup.name == ExactDedup.name
    for name, d in STEPS.items():
        if name in corpus:
            assert corpus[name] == d.full_name
        else:  # a per-shard step with every setting at its default builds the class that carries the same name
            from lmforge.data.pipeline import _spec

            assert _spec(name).build(cache).name == d.full_name


def test_flat_flags_expand_to_the_fixed_order():
    assert step_names(Config()) == ["html_extract_v1", "unicode_normalize_v1", "langid_v1", "cjk_normalize_v1",
                                    "gopher_repetition_v2", "gopher_quality_v2", "exact_dedup_v1"]
    every = Config(**EVERY_SWITCH)
    assert step_names(every) == [
        "html_extract_v1", "unicode_normalize_v1", "line_junk_v1", "langid_v1", "cjk_normalize_v1",
        "gopher_repetition_v2", "gopher_quality_v2", "c4_quality_v2", "fineweb_quality_v2", "toxicity_v1",
        "pii_redact_v1", "domain_tag_v1", "line_dedup_v1", "exact_dedup_v1", "minhash_dedup_v1", "select_v1",
        "mix_v1"]
    specs = {s.name: s for s in preset_pipeline(Config(min_words=30, langid=False, width_normalize=False))}
    assert specs["gopher_quality"].settings.min_words == 30
    assert specs["gopher_quality"].settings.lang_profiles is False  # profiles need the detected language
    assert "langid" not in specs and "cjk_normalize" not in specs
    # the list a preset means is itself a valid pipeline that means the same
    listed = Config(pipeline=[s.to_dict() for s in preset_pipeline(every)])
    assert [s.to_dict() for s in resolve(listed)] == [s.to_dict() for s in preset_pipeline(every)]


@pytest.mark.parametrize("entries, message", [
    ([{"step": "html_extract"}, {"step": "gopher_quality", "min_wrds": 30}],
     "x.yaml: pipeline[1].min_wrds: unknown field of gopher_quality (its fields: min_words, "),
    ([{"step": "gopher_qualty"}], "x.yaml: pipeline[0].step: unknown step 'gopher_qualty' (known: html_extract, "),
    ([{"step": "gopher_quality", "min_words": "many"}],
     "x.yaml: pipeline[0].min_words: Input should be a valid integer"),
    ([{"step": "gopher_quality", "version": 1}],
     "x.yaml: pipeline[0].version: this lmforge has gopher_quality version 2, the pipeline pins version 1"),
    ([{"step": "exact_dedup"}, {"step": "line_dedup"}],
     "x.yaml: pipeline[1].step: line_dedup must come before exact_dedup (at [0])"),
    ([{"step": "line_dedup"}, {"step": "langid"}, {"step": "exact_dedup"}],
     "x.yaml: pipeline[2].step: exact_dedup comes after the per-shard step langid (at [1])"),
    ([{"step": "select", "top_fraction": 0.5}, {"step": "langid"}],
     "x.yaml: pipeline[1].step: langid is a per-shard step after select (at [0])"),
    ([{"step": "exact_dedup"}, {"step": "exact_dedup"}], "x.yaml: pipeline[1].step: exact_dedup is already at [0]"),
    ([{"step": "cjk_normalize", "zh_convert": "t2s"}], "x.yaml: pipeline[0].zh_convert: needs a langid step before"),
    ([{"step": "mix", "targets": {"news": 1}}], "x.yaml: pipeline[0].by: mixing by domain needs a domain_tag step"),
    ([{"step": "select"}], "x.yaml: pipeline[0].top_fraction: Field required (select)"),
    (["exact_dedup"], "x.yaml: pipeline[0]: expected a mapping with a 'step' key"),
])
def test_bad_pipeline_is_one_clear_error(entries, message):
    with pytest.raises(ConfigError) as err:
        validate(Config, {"pipeline": entries}, "x.yaml")
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_flat_step_setting_beside_a_list_is_an_error():
    with pytest.raises(ConfigError, match=r"x.yaml: pipeline: min_words is set too, beside the list \(a "
                                          r"gopher_quality setting"):
        validate(Config, {"pipeline": [{"step": "exact_dedup"}], "min_words": 3}, "x.yaml")
    with pytest.raises(ConfigError, match="line_junk is set too, beside the list .a switch of the flat preset"):
        validate(Config, {"pipeline": [{"step": "exact_dedup"}], "line_junk": True}, "x.yaml")
    # run-wide fields go beside the list; a versioned name from a manifest is accepted
    c = validate(Config, {"pipeline": [{"step": "gopher_quality_v2", "min_words": 3}], "shards": 2}, "x.yaml")
    assert c.pipeline[0]["version"] == 2 and c.pipeline[0]["min_words"] == 3 and c.pipeline[0]["max_words"] == 100_000


def test_cli_prints_the_preset_and_its_list_runs_byte_identical_to_the_flags(tmp_path):
    """`lmforge data pipeline FLAGS` prints a list; a config with that list gives the flags' output byte for byte."""
    src = small_inputs(tmp_path)
    (src / "topics.jsonl.zst").write_bytes((DEMO / "jsonl" / "python-topics.jsonl.zst").read_bytes())
    (src / "zh.jsonl").write_text(json.dumps({"id": "zh", "text": DAODEJING * 3}, ensure_ascii=False) + "\n")
    flags = ["--line-junk", "--c4-quality", "--fineweb-quality", "--pii", "--domains", "--toxicity", "--line-dedup",
             "--line-dedup-max-docs", "2", "--minhash", "--minhash-threshold", "0.5", "--zh-convert", "t2s",
             "--top-fraction", "0.8", "--select-score", "lang_score", "--min-words", "40"]
    shown = _lmforge("data", "pipeline", *flags, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    listed = yaml.safe_load(shown.stdout)["pipeline"]
    assert [e["step"] for e in listed][-5:] == ["domain_tag", "line_dedup", "exact_dedup", "minhash_dedup", "select"]
    assert {"step": "gopher_quality", "min_words": 40} in listed  # only settings off their default are printed
    cfg = tmp_path / "list.yaml"
    cfg.write_text(yaml.safe_dump({"inputs": [str(src)], "shards": 2, "pipeline": listed}))
    a = _lmforge("data", "run", "--inputs", str(src), "--shards", "2", *flags, "--out", str(tmp_path / "flags"),
                 cwd=tmp_path)
    assert a.returncode == 0, a.stderr[-2000:]
    b = _lmforge("data", "run", "-c", str(cfg), "--out", str(tmp_path / "list"), cwd=tmp_path)
    assert b.returncode == 0, b.stderr[-2000:]

    def outputs(out: Path) -> dict[str, bytes]:
        return {str(f.relative_to(out)): f.read_bytes() for sub in ("docs", "dropped") for f in sorted((out / sub).iterdir())}

    def counts(out: Path) -> dict:
        stats = json.loads((out / "stats.json").read_text())
        for st in stats["steps"]:
            st.pop("seconds"), st.pop("us_per_doc")
        return {k: stats[k] for k in ("read", "steps", "totals", "dropped_by_reason", "profile", "examples")}

    assert outputs(tmp_path / "flags") == outputs(tmp_path / "list")
    assert counts(tmp_path / "flags") == counts(tmp_path / "list")
    stats = check_conservation(tmp_path / "list")
    assert [s["name"] for s in stats["steps"]] == [f"{e['step']}_v{STEPS[e['step']].version}" for e in listed]
    manifest = json.loads((tmp_path / "list" / "manifest.json").read_text())
    assert manifest["config"]["pipeline"][0] == {"step": "html_extract", "version": 1, "extractor": "resiliparse",
                                                 "main_content": True, "timeout": 0.0}  # the full, pinned list
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"inputs": [str(src)], "pipeline": [{"step": "exact_dedup", "max_dcs": 3}]}))
    r = _lmforge("data", "run", "-c", str(bad), "--out", str(tmp_path / "bad"), cwd=tmp_path)
    assert r.returncode == 2 and f"{bad}: pipeline[0].max_dcs: unknown field of exact_dedup (its fields: none)" \
        in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_per_shard_steps_after_the_dedup_steps_run_on_the_deduplicated_corpus(tmp_path):
    src = small_inputs(tmp_path)
    base = [{"step": "html_extract"}, {"step": "unicode_normalize"}]
    first = Config(inputs=[str(src)], shards=2, pipeline=base + [{"step": "langid"}, {"step": "exact_dedup"}])
    after = Config(inputs=[str(src)], shards=2, pipeline=base + [{"step": "exact_dedup"}, {"step": "langid"},
                                                                  {"step": "gopher_quality", "min_words": 20}])
    assert [s.name for s in phases(resolve(after)).after_dedup] == ["langid", "gopher_quality"]
    run(first, tmp_path / "first")
    run(after, tmp_path / "after")
    s1, s2 = check_conservation(tmp_path / "first"), check_conservation(tmp_path / "after")
    assert [s["name"] for s in s2["steps"]] == ["html_extract_v1", "unicode_normalize_v1", "exact_dedup_v1",
                                                "langid_v1", "gopher_quality_v2"]
    dups = s2["steps"][2]["dropped"]["exact_duplicate"]
    assert dups > 0 and s2["steps"][3]["in"] == s1["steps"][2]["in"] - dups  # langid saw only the survivors
    kept = {d["id"]: d for d in iter_documents(tmp_path / "after")}
    assert kept and all("lang" in d["meta"] for d in kept.values())
    assert set(kept) <= {d["id"] for d in iter_documents(tmp_path / "first")}


# ----------------------------------------------------------------------------------------------------------------------
# select / mix: quantiles over all shards from small per-shard summaries


def _ranked_on_one_machine(recs: list[dict], top_fraction: float, targets: dict[str, float], max_repeat: float):
    """The reference: every document's score, u and group in one array, ranked with one sort."""
    from lmforge.data.mixing import plan_copies, uniform

    scores = np.array([r["meta"]["s"] for r in recs])
    us = np.array([uniform(r["id"]) for r in recs])
    groups = np.array([r["meta"]["lang"] for r in recs])
    k = int(np.ceil(top_fraction * len(recs)))
    keep = np.zeros(len(recs), bool)
    keep[np.lexsort((us, -scores))[:k]] = True
    copies = keep.astype(int)
    sizes = {g: int((keep & (groups == g)).sum()) for g in dict.fromkeys(groups[keep])}
    plan = plan_copies(sizes, targets, max_repeat)
    for g, size in sizes.items():
        idx = np.flatnonzero(keep & (groups == g))
        extra = plan[g] % size
        cut = -1.0 if extra == 0 else float(np.partition(us[idx], extra)[extra])
        copies[idx] = plan[g] // size + (us[idx] < cut)
    return {r["id"]: int(c) for r, c in zip(recs, copies)}


@pytest.mark.parametrize("fetch", [3, 100_000])  # 3: several radix rounds before the few left are fetched
def test_select_and_mix_rank_across_shards_like_one_sort(tmp_path, monkeypatch, fetch):
    from lmforge.data import mixing
    from lmforge.data.executor import local_map
    from lmforge.data.io import ShardWriter
    from lmforge.data.documents import Document

    rng = np.random.default_rng(0)
    recs = [{"id": f"d{j}", "text": f"doc {j}", "meta": {"s": float(rng.integers(0, 6)) / 5,  # many tied scores
                                                         "lang": str(rng.choice(["en", "zh", "fr"]))}}
            for j in range(300)]
    recs[7]["meta"]["s"] = -0.0  # -0.0 ties with 0.0
    names = [f"part-{i:05d}" for i in range(3)]
    for i, name in enumerate(names):
        with ShardWriter(tmp_path / "docs" / f"{name}.jsonl.zst") as w:
            for r in recs[i * 100: (i + 1) * 100]:
                w.write(Document.from_dict(r))
    expected = _ranked_on_one_machine(recs, 0.37, {"en": 0.5, "*": 0.5}, 2.0)
    calls: list[tuple[str, Any]] = []

    def mapper(fn, args):
        out = local_map(fn, args)
        calls.extend((fn.__name__, o) for o in out)
        return out

    monkeypatch.setattr(mixing, "RANK_FETCH", fetch)
    spec = mixing.MixSpec(top_fraction=0.37, score_key="s", by="lang", targets={"en": 0.5, "*": 0.5}, max_repeat=2)
    res = mixing.select_pass(tmp_path, names, spec, mapper)
    got: dict[str, int] = {}
    for d in iter_documents(tmp_path / "docs"):
        base = d["id"].split("#rep")[0]
        got[base] = got.get(base, 0) + 1
    assert {i: c for i, c in expected.items() if c} == got
    rounds = [o for name, o in calls if name == "rank_counts"]
    if fetch == 3:
        assert rounds and all(o.shape == (256,) for o in rounds)  # the driver sums 256 counters per shard
    else:
        assert not rounds
        assert all(len(o[0]) <= fetch for n, o in calls if n == "rank_members")  # only the few left are fetched
    sel, mix = res["steps"]
    assert sel["kept"] == 111 and sel["dropped"] == {"select_low": 189}
    assert mix["in"] == 111 and res["written"] == sum(expected.values())
    assert not list((tmp_path / "work").glob("*.select.npz"))


def test_docs_table_lists_every_step_with_its_version_and_settings():
    import re

    rows = {m[0]: (int(m[1]), m[2]) for m in
            re.findall(r"^\| `(\w+)` \| (\d+) \| [\w-]+ \| (.*) \|$", (ROOT / "docs" / "data_pipeline.md").read_text(),
                       re.M)}
    assert set(rows) == set(STEPS)
    for name, d in STEPS.items():
        version, settings = rows[name]
        assert version == d.version, name
        for key in d.settings:
            assert key in settings, (name, key)
