"""Artifacts, manifests, fingerprints, the registry and config loading."""

import json
import typing

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

from lmforge import registry
from lmforge.artifacts import StageRun, atomic_path, fingerprint_input, read_manifest, write_json
from lmforge.config import ConfigError, StageConfig, command_from_config, load_config


class Toy(StageConfig):
    size: int = Field(3, ge=1, description="a size")
    name: str = "x"
    tags: list[str] = []
    fast: bool = False
    mode: typing.Literal["a", "b"] = "a"


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}


def test_fingerprint_tracks_content_and_config(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "a.txt").write_text("hello")
    f1 = fingerprint_input(src)
    (src / "a.txt").write_text("hello!")
    assert fingerprint_input(src) != f1
    r1 = StageRun("toy", "1", tmp_path / "o", {"k": 1}, {"raw": src})
    r2 = StageRun("toy", "1", tmp_path / "o", {"k": 2}, {"raw": src})
    r3 = StageRun("toy", "2", tmp_path / "o", {"k": 1}, {"raw": src})
    assert len({r1.fingerprint, r2.fingerprint, r3.fingerprint}) == 3
    with pytest.raises(FileNotFoundError, match="matches no file"):
        fingerprint_input(tmp_path / "nothing-*.txt")


def test_stage_run_lifecycle_and_registry(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("data")
    out = tmp_path / "art"
    run = StageRun("toy", "1", out, {"k": 1}, {"raw": src})
    assert not run.up_to_date()
    with run:
        assert read_manifest(out).status == "running"
        (out / "result.txt").write_text("ok")
        run.metrics["score"] = 0.5
    m = read_manifest(out)
    assert m.status == "done" and m.outputs == ["result.txt"] and m.metrics == {"score": 0.5}
    assert StageRun("toy", "1", out, {"k": 1}, {"raw": src}).up_to_date()

    # a downstream run records an edge to the upstream artifact; its identity is the upstream run id
    down = StageRun("toy2", "1", tmp_path / "down", {}, {"upstream": out})
    assert down.inputs["upstream"].fingerprint == f"run:{m.run_id}"
    with down:
        pass
    tree = registry.lineage(tmp_path / "down")
    assert tree["stage"] == "toy2"
    assert tree["inputs"]["upstream"]["stage"] == "toy"
    assert tree["inputs"]["upstream"]["inputs"]["raw"]["raw"] is True
    assert [r["stage"] for r in registry.list_runs()] == ["toy2", "toy"]

    failing = StageRun("toy", "1", tmp_path / "bad", {}, {})
    with pytest.raises(ValueError):
        with failing:
            raise ValueError("boom")
    bad = read_manifest(tmp_path / "bad")
    assert bad.status == "failed" and "boom" in bad.error
    assert StageRun("toy", "1", tmp_path / "bad", {}, {}).resumable()
    with pytest.raises(ValueError, match="unfinished artifact"):
        fingerprint_input(tmp_path / "bad")


def test_config_errors_name_file_and_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("size: 2\nnmae: typo\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: nmae: unknown key"):
        load_config(Toy, cfg)
    cfg.write_text("size: zero\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: size: .*integer"):
        load_config(Toy, cfg)
    cfg.write_text("size: [1,\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: invalid YAML"):
        load_config(Toy, cfg)
    cfg.write_text("size: 5\nname: y\n")
    assert load_config(Toy, cfg, {"name": "z"}) == Toy(size=5, name="z")


def test_cli_flags_map_one_to_one_onto_config_fields(tmp_path):
    seen = []
    app = typer.Typer()
    app.command("toy")(command_from_config(Toy, seen.append))
    app.command("other")(lambda: None)
    runner = CliRunner()
    res = runner.invoke(app, ["toy", "--size", "7", "--tags", "a", "--tags", "b", "--fast", "--mode", "b"])
    assert res.exit_code == 0, res.output
    assert seen[-1] == Toy(size=7, tags=["a", "b"], fast=True, mode="b")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("size: 4\nname: fromfile\n")
    assert runner.invoke(app, ["toy", "--config", str(cfg), "--name", "flag"]).exit_code == 0
    assert seen[-1] == Toy(size=4, name="flag")
    res = runner.invoke(app, ["toy", "--size", "0"])
    assert res.exit_code == 2 and "size" in res.output
    help_text = runner.invoke(app, ["toy", "--help"]).output
    for flag in ("--size", "--name", "--tags", "--fast", "--mode", "--config"):
        assert flag in help_text


def test_execution_fields_do_not_change_the_fingerprint(tmp_path):
    a = StageRun("toy", "1", tmp_path / "o", {"k": 1, "workers": 1}, {}, execution_fields={"workers"})
    b = StageRun("toy", "1", tmp_path / "o", {"k": 1, "workers": 4}, {}, execution_fields={"workers"})
    c = StageRun("toy", "1", tmp_path / "o", {"k": 2, "workers": 4}, {}, execution_fields={"workers"})
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_fingerprint_of_a_folder_with_a_non_utf8_file_name(tmp_path):
    import os

    from lmforge.artifacts import fingerprint_input

    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "ok.txt").write_text("hello")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "wb") as f:  # a Latin-1 name, as old archives have
        f.write(b"bonjour")
    first = fingerprint_input(folder)
    assert first.startswith("sha256:") and fingerprint_input(folder) == first
