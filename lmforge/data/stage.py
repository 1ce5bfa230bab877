"""The data stage: raw files → clean, deduplicated ``{id, text, meta}`` JSONL.zst shards.

Pipeline (per shard): read (WARC / HTML / JSONL / text) → ``html_extract_v1`` → ``unicode_normalize_v1`` →
[``line_junk_v1``] → ``langid_v1`` → ``cjk_normalize_v1`` → ``gopher_repetition_v2`` → ``gopher_quality_v2`` → [``c4_quality_v2``] →
[``fineweb_quality_v2``] → [``toxicity_v1``] → [``quality_v1``] → [``pii_redact_v1``]; then over all shards:
[``line_dedup_v1``] → ``exact_dedup_v1`` →
[``minhash_dedup_v1``] → [``select_v1``] → [``mix_v1``].  Bracketed steps are off by default.

That fixed order is the preset of the flat switches below; a ``pipeline`` list composes the steps freely, each with
its own settings (:mod:`lmforge.data.pipeline`; ``lmforge data pipeline [flags]`` prints the list a preset means).

    from lmforge.data.stage import Config, run
    manifest = run(Config(inputs=["data/demo"]), "runs/data")
    manifest.metrics["docs_kept"]

Later stages read the result with :func:`lmforge.data.io.iter_documents`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from lmforge.artifacts import Manifest, expand_paths, write_bytes
from lmforge.config import StageConfig
from lmforge.stages import begin, finished

READ_FORMATS = (".warc/.arc (.gz), .wet, .html/.htm/.xhtml, .jsonl/.ndjson/.json/.json.gz, .txt/.text, .parquet "
                "(text formats also .gz/.zst compressed)")

STAGE = "data"
VERSION = "3"


class Config(StageConfig):
    """Read raw text (WARC, HTML, JSONL, plain text), extract, normalise, filter and deduplicate it."""

    inputs: list[str] = Field(
        default_factory=lambda: ["data/demo"],
        description="Input files, folders (read recursively) or globs: .warc(.gz), .html, .jsonl(.gz/.zst), .parquet, "
                    ".txt(.gz).",
    )
    output_format: Literal["jsonl", "parquet"] = Field(
        "jsonl", description="Kept documents as JSONL.zst or Parquet (id, text, meta as a JSON string) shards.")
    shards: int = Field(4, ge=1, description="Number of output shards (input files are spread over them by size).")
    workers: int = Field(1, ge=1, description="Worker processes for the shards (1 = in this process); with "
                                              "executor ray and no ray_address, the CPUs of the local Ray instance.")
    executor: Literal["local", "ray"] = Field(
        "local", description="Where shards and corpus-wide tasks run: local processes, or Ray tasks (pip install "
                             "'lmforge[ray]'); the output is the same.")
    ray_address: Optional[str] = Field(
        None, description="Executor ray: the cluster to join (auto, HOST:PORT or ray://HOST:PORT); none starts a "
                          "local Ray instance for the run. The output folder must be on storage every node sees.")
    extractor: Literal["resiliparse", "trafilatura"] = Field(
        "resiliparse", description="HTML main-text extractor (trafilatura is an optional extra)."
    )
    main_content: bool = Field(True, description="Keep the main content of HTML pages only (drop navigation etc.).")
    extract_timeout: float = Field(
        0.0, ge=0, description="Seconds one HTML page may take to extract (0 = no limit); a slower page is dropped as "
                               "extract_timeout (the extractor then runs in a helper process, which is killed)."
    )
    txt_chunk_chars: int = Field(
        20_000, ge=0, description="Split plain-text files into documents of about this many characters at blank "
                                  "lines (0 = one document per file)."
    )
    word_split: Literal["whitespace", "spacy"] = Field(
        "whitespace", description="How the Gopher/C4/FineWeb rules count words: 'whitespace' (a word is a "
                                  "whitespace-separated chunk, as in the Gopher paper) or 'spacy' (punctuation marks "
                                  "are words too, as datatrove's spaCy tokenizer counts; drops punctuation-heavy prose "
                                  "such as verse and dialogue by the alpha-words rule)."
    )
    # gopher_quality_v2 (Rae et al. 2021 defaults)
    min_words: int = Field(50, ge=0, description="Drop documents with fewer words (CJK characters count as words).")
    max_words: int = Field(100_000, ge=1, description="Drop documents with more words.")
    min_mean_word_length: float = Field(3.0, description="Drop documents whose mean word length is below this.")
    max_mean_word_length: float = Field(10.0, description="Drop documents whose mean word length is above this.")
    max_symbol_word_ratio: float = Field(0.1, description="Max ratio of '#' and ellipses to words.")
    max_bullet_lines_frac: float = Field(0.9, description="Max fraction of lines that start with a bullet.")
    max_ellipsis_lines_frac: float = Field(0.3, description="Max fraction of lines that end with an ellipsis.")
    min_alpha_words_frac: float = Field(0.8, description="Min fraction of words that contain a letter.")
    min_stop_words: int = Field(
        2, ge=0, description="Min number of distinct English stop words (the, be, to, of, and, that, have, with); "
                             "0 turns the rule off (non-English corpora)."
    )
    # gopher_repetition_v2
    max_dup_line_frac: float = Field(0.30, description="Max fraction of lines that repeat an earlier line.")
    max_dup_para_frac: float = Field(0.30, description="Max fraction of paragraphs that repeat an earlier one.")
    max_dup_line_char_frac: float = Field(0.20, description="Max fraction of characters in repeated lines.")
    max_dup_para_char_frac: float = Field(0.20, description="Max fraction of characters in repeated paragraphs.")
    top_ngram_fracs: list[float] = Field(
        default_factory=lambda: [0.20, 0.18, 0.16],
        description="Max fraction of characters covered by the most frequent 2-, 3-, 4-gram.",
    )
    dup_ngram_fracs: list[float] = Field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
        description="Max fraction of characters in repeated 5-, 6-, … 10-grams.",
    )
    # switches
    gopher_repetition: bool = Field(True, description="Run the Gopher repetition filter.")
    gopher_quality: bool = Field(True, description="Run the Gopher quality filter.")
    dedup: bool = Field(True, description="Drop exact duplicates (after normalising case, punctuation, whitespace).")
    # line_junk_v1
    line_junk: bool = Field(False, description="Remove navigation / cookie / 'read more' / symbol-heavy lines.")
    line_junk_require_punct: bool = Field(
        False, description="Also remove every line without terminal punctuation (as C4 does).")
    # langid_v1
    langid: bool = Field(True, description="Identify the language (fastText lid.176): meta.lang, meta.lang_score.")
    langs: list[str] = Field(default_factory=list,
                             description="Keep only these languages (ISO codes, e.g. en zh); empty keeps all.")
    lang_min_score: float = Field(0.0, ge=0, le=1, description="Drop documents whose language score is lower "
                                                               "(FineWeb uses 0.65).")
    lang_thresholds: dict[str, float] = Field(default_factory=dict,
                                              description="Per-language minimum scores (YAML only), e.g. {en: 0.65}.")
    mixed_langs: Literal["off", "keep", "drop", "split"] = Field(
        "keep", description="Mixed-language documents (paragraph-level language ID; meta.lang_shares, meta.mixed): "
                            "keep, drop (mixed_language) or split into one document per language; off skips the "
                            "per-paragraph language ID.")
    mixed_min_share: float = Field(0.2, ge=0, le=1, description="A document is mixed when its second language has at "
                                                               "least this share of the characters.")
    width_normalize: bool = Field(True, description="Full-width Latin letters / digits → ASCII, half-width katakana "
                                                    "→ full-width (cjk_normalize_v1; Chinese punctuation is kept).")
    zh_convert: Literal["none", "t2s", "s2t", "tw2s", "hk2s"] = Field(
        "none", description="Convert Chinese documents (meta.lang zh) with OpenCC: t2s = traditional → simplified, "
                            "s2t the reverse, tw2s / hk2s from Taiwan / Hong Kong standards (needs langid).")
    lang_profiles: bool = Field(
        True, description="Apply each language's own rule thresholds, stop words and word segmentation "
                          "(lmforge/data/lang_profiles.yaml, FineWeb-2's values) to the Gopher/C4/FineWeb rules, by "
                          "the detected language; the config's rule values then apply to English (and to documents "
                          "without a language). Languages without a profile skip the stop-word and word-length rules.")
    lang_profiles_file: Optional[str] = Field(
        None, description="A YAML file of extra / overriding language profiles (same keys as the built-in table).")
    # c4_quality_v2 / fineweb_quality_v2
    c4_quality: bool = Field(False, description="Run C4's line and document rules (removes lines from the text).")
    c4_min_sentences: int = Field(5, description="C4: drop documents with fewer sentences after line filtering.")
    c4_curly_bracket: bool = Field(True, description="C4: drop documents containing '{' (drops code pages).")
    fineweb_quality: bool = Field(False, description="Run FineWeb's quality rules (punctuation, short lines, "
                                                     "duplicated lines, lists).")
    # toxicity_v1 / pii_redact_v1
    toxicity: bool = Field(False, description="Score offensive language (word lists + classifier) and drop above "
                                              "the thresholds.")
    max_badword_ratio: float = Field(0.02, description="Toxicity: max fraction of words on the bad-word lists.")
    max_toxicity: float = Field(0.95, description="Toxicity: max classifier score (alt-profanity-check).")
    toxicity_classifier: bool = Field(True, description="Toxicity: run the classifier too (English model).")
    pii: bool = Field(False, description="Redact e-mails, phones, IP addresses, card numbers, Chinese ID numbers.")
    pii_kinds: list[str] = Field(default_factory=list, description="PII kinds to redact (empty = all): email, phone, "
                                                                   "ipv4, ipv6, credit_card, cn_id, cn_mobile, cn_bank_card.")
    # quality_v1
    quality_model: Optional[str] = Field(None, description="Folder of a model from `lmforge data train-quality`: "
                                                           "score every document (meta.quality).")
    quality_threshold: float = Field(0.0, ge=0, le=1, description="Drop documents whose quality score is lower.")
    # domain_tag_v1, select_v1, mix_v1
    domains: bool = Field(False, description="Tag documents with meta.domain (URL-host rules, then keyword rules).")
    domain_hosts: dict[str, str] = Field(default_factory=dict, description="Extra host-suffix → domain rules, tried "
                                                                           "before the built-in ones (YAML only).")
    top_fraction: Optional[float] = Field(None, gt=0, le=1, description="Keep only this top fraction of the corpus "
                                                                        "by meta.<select_score> (e.g. 0.3).")
    select_score: str = Field("quality", description="The meta score top_fraction ranks by (quality needs "
                                                     "quality_model).")
    mix_by: Literal["domain", "lang"] = Field("domain", description="The meta field mix_targets are shares of.")
    mix_targets: dict[str, float] = Field(default_factory=dict, description="Target share per domain or language "
                                                                            "(YAML only), e.g. {en: 0.7, zh: 0.3}; "
                                                                            "'*' covers the rest.")
    mix_max_repeat: float = Field(1.0, ge=1, description="Mixing may repeat a document up to this many times "
                                                         "(1 = down-sampling only).")
    # line_dedup_v1
    line_dedup: bool = Field(False, description="Remove lines (or paragraphs) repeated across many documents of the "
                                                "corpus: navigation, footers, cookie notices (CCNet-style).")
    line_dedup_unit: Literal["line", "paragraph"] = Field("line", description="Line dedup: the unit counted and "
                                                                             "removed.")
    line_dedup_max_docs: int = Field(10, ge=1, description="Line dedup: remove a unit found in more than this many "
                                                           "documents.")
    line_dedup_min_words: int = Field(50, ge=0, description="Line dedup: drop a document left with fewer words.")
    # minhash_dedup_v1
    minhash: bool = Field(False, description="Drop near-duplicates (MinHash-LSH across all shards).")
    minhash_ngram: int = Field(5, ge=1, description="MinHash: words per shingle.")
    minhash_bands: int = Field(14, ge=1, description="MinHash: LSH bands.")
    minhash_rows: int = Field(8, ge=1, description="MinHash: rows (hashes) per band.")
    minhash_threshold: float = Field(0.7, ge=0, le=1, description="MinHash: link two bucket mates only if their "
                                                                  "signatures estimate a Jaccard similarity of at "
                                                                  "least this (0 = link every bucket mate).")
    # the composable form (declared last: its check sees every field above)
    pipeline: Optional[list[Any]] = Field(
        None, description="The steps as a list (YAML only), each {step: NAME, [version: N], its settings...}, e.g. "
                          "[{step: html_extract}, {step: gopher_quality, min_words: 30}, {step: exact_dedup}]; "
                          "replaces the switches and step settings above (see `lmforge data pipeline`).")

    @field_validator("pipeline")
    @classmethod
    def _check_pipeline(cls, items: Optional[list[Any]], info: Any) -> Optional[list[dict[str, Any]]]:
        """Every entry validated and completed (version, defaults), so the manifest and fingerprint say exactly what
        runs; a flat step setting changed beside a list is an error (it would be silently ignored)."""
        if items is None:
            return None
        from lmforge.data.pipeline import PipelineError, owner_of, parse_pipeline, step_fields

        try:
            specs = parse_pipeline(items)
        except PipelineError as err:
            raise PydanticCustomError("pipeline", str(err)) from None
        for name in sorted(step_fields()):
            if name in info.data and info.data[name] != cls.model_fields[name].get_default(call_default_factory=True):
                owner = owner_of(name)
                where = f"a {owner} setting: give it in that step's entry" if owner else \
                    "a switch of the flat preset: add or leave out the step instead"
                raise PydanticCustomError("pipeline", f"{name} is set too, beside the list ({where}; `lmforge data "
                                                      f"pipeline` shows a config as a list)")
        return [s.to_dict() for s in specs]


RUN_FIELDS = {"inputs", "output_format", "shards", "workers", "executor", "ray_address", "txt_chunk_chars", "pipeline"}
"""The fields that are about the run (what to read, where and how to write), not about a step."""


def build_steps(config: dict[str, Any]) -> list:
    """The per-shard steps that run on every shard (before the corpus-wide steps) for a config (a plain dict, so
    worker processes can rebuild them)."""
    from lmforge.data.pipeline import build_shard_steps, phases, resolve

    return build_shard_steps([s.to_dict() for s in phases(resolve(Config.model_validate(config))).shard])


def step_names(config: Config) -> list[str]:
    """The versioned names of a config's steps, in order (``gopher_quality_v2``)."""
    from lmforge.data.pipeline import resolve

    return [s.full_name for s in resolve(config)]


def minhash_params(config: Config):
    """The config's MinHash settings (None when its pipeline has no minhash_dedup step)."""
    from lmforge.data.pipeline import phases, resolve

    return phases(resolve(config)).minhash


def line_dedup_params(config: Config):
    """The config's line dedup settings (None when its pipeline has no line_dedup step)."""
    from lmforge.data.pipeline import phases, resolve

    return phases(resolve(config)).line_dedup


def collect_inputs(specs: list[str]) -> tuple[list[Path], dict[str, list[str]]]:
    """Expand the input specs to a de-duplicated list of readable files, and the files skipped by reason."""
    from lmforge.data.readers import file_format

    files: list[Path] = []
    seen: set[Path] = set()
    skipped: dict[str, list[str]] = {}
    for spec in specs:
        matched = expand_paths(spec)
        if not matched:
            what = "is an empty folder" if Path(spec).is_dir() else "matches no file"
            raise FileNotFoundError(f"data input {spec!r} {what}; the data stage reads {READ_FORMATS}")
        for f in matched:
            key = f.resolve()
            if key in seen:
                continue
            seen.add(key)
            if file_format(f) is None:
                skipped.setdefault("unknown_format", []).append(str(f))
            else:
                files.append(f)
    if not files:
        unknown = skipped.get("unknown_format", [])
        raise ValueError(f"data: nothing to read in {', '.join(specs)}: found {len(unknown)} file(s) "
                         f"({_count_by_extension(unknown)}), none in a format the data stage reads ({READ_FORMATS})")
    return files, skipped


def _count_by_extension(names: list[str]) -> str:
    from collections import Counter

    counts = Counter(Path(n).suffix.lower() or "(no extension)" for n in names)
    return ", ".join(f"{ext}: {n}" for ext, n in counts.most_common())


@contextlib.contextmanager
def _executor_session(config: Config) -> Iterator[None]:
    """Ray's connection lives for the run (a local instance started for it is stopped after it)."""
    try:
        yield
    finally:
        if config.executor == "ray":
            from lmforge.data import ray_executor

            ray_executor.shutdown()


def run(config: Config, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    from lmforge.data.executor import clean, execute
    from lmforge.data.readers import read_file
    from lmforge.data.report import render
    from lmforge.data.pipeline import build_shard_steps, phases, resolve
    from lmforge.data.steps import ExactDedup, HtmlExtract
    from lmforge.progress import console
    from lmforge.storage import local_copy, is_url, origins_of

    if any(is_url(spec) for spec in config.inputs):  # the Python API takes URLs too (the CLI copies them first)
        config = config.model_copy(update={"inputs": [str(local_copy(s)) if is_url(s) else s for s in config.inputs]})
    out = Path(out_dir)
    if not config.inputs:
        raise ValueError("data: no inputs given")
    specs = resolve(config)  # the pipeline list (the flat switches' preset when none is given)
    plan = phases(specs)
    inputs = {f"raw{i}": spec for i, spec in enumerate(config.inputs)}
    models = [s.settings.model for s in specs if s.name == "quality"]
    for k, model in enumerate(models):
        inputs["quality_model" if k == 0 else f"quality_model{k}"] = model
    if any(s.name == "html_extract" and s.settings.extractor == "trafilatura" for s in specs):
        HtmlExtract("trafilatura")  # fail now, with the install hint, before the run starts or a worker imports it
    # without a list the config is what it always was (same fingerprint as runs made before lists existed)
    cfg = config.model_dump(exclude={"pipeline"} if config.pipeline is None else None)
    files, skipped = collect_inputs(config.inputs)  # before the run starts: nothing to read is an error now
    stage_run = begin(STAGE, VERSION, out, cfg, inputs=inputs, force=force,
                      execution_fields={"workers", "executor", "ray_address"})
    if stage_run is None:
        return finished(out)
    resume = stage_run.resumable() and not force

    for reason, names in skipped.items():
        console.print(f"[yellow]⚠ {reason}[/]: {len(names)} file(s) not read: {', '.join(names[:5])}"
                      + (" …" if len(names) > 5 else ""), highlight=False)
    with stage_run, _executor_session(config):
        if not resume:
            clean(out)
        stats = execute(
            files, out,
            make_steps=functools.partial(build_shard_steps, [s.to_dict() for s in plan.shard]),
            final_steps=(functools.partial(build_shard_steps, [s.to_dict() for s in plan.after_dedup])
                         if plan.after_dedup else None),
            reader=functools.partial(read_file, chunk_chars=config.txt_chunk_chars,
                                     origins=origins_of(config.inputs)),
            dedup=ExactDedup() if plan.exact_dedup else None,
            shards=config.shards,
            workers=config.workers,
            fingerprint=stage_run.fingerprint,
            skipped_files=skipped,
            minhash=plan.minhash,
            line_dedup=plan.line_dedup,
            select=plan.select,
            output_format=config.output_format,
            executor=config.executor,
            ray_address=config.ray_address,
        )
        # backslashreplace: a file name that is not UTF-8 (a lone surrogate from os.fsdecode) must not fail the run
        write_bytes(out / "report.html",
                    render(stats, title=f"lmforge data report: {out}").encode("utf-8", "backslashreplace"))
        t = stats["totals"]
        if t["docs_in"] == 0:
            errors = ", ".join(f"{k}: {v}" for k, v in stats["read"]["errors"].items()) or "none"
            raise ValueError(f"data: read 0 documents from {len(files)} file(s) in {', '.join(config.inputs)} "
                             f"(read errors: {errors}); see {out / 'report.html'}")
        stage_run.metrics.update(
            docs_in=t["docs_in"],
            docs_kept=t["docs_kept"],
            docs_dropped=t["docs_dropped"],
            docs_added=t.get("docs_added", 0),
            bytes_kept=t["bytes_kept"],
            docs_written=t["docs_written"],
            read_errors=t["read_errors"],
            files=stats["inputs"]["files"],
            bytes_in=stats["inputs"]["bytes"],
            shards=config.shards,
            shards_resumed=sum(1 for s in stats["shards"] if s["resumed"]),
            seconds=stats["timing"]["seconds"],
            docs_per_s=stats["timing"]["docs_per_s"],
            input_mb_per_s=stats["timing"]["input_mb_per_s"],
            steps=[s.full_name for s in specs],
            dropped_by_reason=stats["dropped_by_reason"],
            read_errors_by_reason=stats["read"]["errors"],
        )
        console.print(
            f"[green]✓ data[/]: {t['docs_kept']:,} of {t['docs_in']:,} documents kept "
            f"({t['bytes_kept'] / 1e6:,.2f} MB), {t['docs_dropped']:,} dropped"
            + (f", {t['docs_added']:,} added (mixed-language splits)" if t.get("docs_added") else "")
            + f", {t['read_errors']:,} read errors; "
            f"{stats['timing']['docs_per_s'] or 0:,.0f} docs/s → {out}"
        )
    return finished(out)
