"""A data pipeline as a list of steps: each step its name, version and own config, composed in YAML.

    pipeline:
      - {step: html_extract}
      - {step: unicode_normalize}
      - {step: langid, langs: [en]}
      - {step: gopher_quality, min_words: 30}
      - {step: exact_dedup}
      - {step: minhash_dedup, threshold: 0.8}

Every step of the data stage is registered here (:data:`STEPS`) with its version and the settings it takes; each
setting mirrors a field of the flat :class:`lmforge.data.stage.Config` (same type, default and description), so
``gopher_quality.min_words`` is the flat ``min_words``.  Without a ``pipeline`` the flat config is a preset:
:func:`preset_pipeline` expands it to the list today's switches mean (``lmforge data pipeline [flags]`` prints it).

Two kinds of steps:

- per-shard steps (``html_extract`` … ``domain_tag``) see one document at a time and run on every shard in parallel;
- corpus-wide steps (``line_dedup``, ``exact_dedup``, ``minhash_dedup``, ``select``, ``mix``) need the whole corpus
  and run as the executor's phase 2 (:mod:`lmforge.data.global_pass`, :mod:`lmforge.data.mixing`).

The executors run a list in three parts (:class:`Phases`): the per-shard steps before the first corpus-wide step (on
each shard), the dedup steps in the order line → exact → MinHash, then per-shard steps after them (run in the same
pass that applies the dedup decisions: e.g. an expensive model scores only the deduplicated documents), then
``select`` and ``mix``.  A list that does not fit this shape is an error naming the step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from lmforge.data.steps import Step

if TYPE_CHECKING:
    from lmforge.data.stage import Config

PROFILED = {"word_split": "word_split", "lang_profiles": "lang_profiles", "lang_profiles_file": "lang_profiles_file"}


@dataclass(frozen=True)
class StepDef:
    """One registered step: ``settings`` maps each of its keys to the flat config field it mirrors (or to its own
    ``(type, Field)``); ``build(settings, cache)`` makes the :class:`Step` (per-shard steps only)."""

    name: str
    version: int
    kind: Literal["shard", "corpus"]
    summary: str
    settings: dict[str, Any] = field(default_factory=dict)
    build: Optional[Callable[[BaseModel, dict], Step]] = None

    @property
    def full_name(self) -> str:
        return f"{self.name}_v{self.version}"


class StepSettings(BaseModel):
    """Base of every step's own settings model (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _profiles(s: Any, cache: dict) -> Any:
    if not s.lang_profiles:
        return None
    key = ("profiles", s.lang_profiles_file)
    if key not in cache:
        from lmforge.data.langprofiles import LangProfiles

        cache[key] = LangProfiles.load(s.lang_profiles_file)
    return cache[key]


def _html_extract(s: Any, cache: dict) -> Step:
    from lmforge.data.steps import HtmlExtract

    return HtmlExtract(s.extractor, s.main_content, s.timeout)


def _unicode_normalize(s: Any, cache: dict) -> Step:
    from lmforge.data.steps import UnicodeNormalize

    return UnicodeNormalize()


def _line_junk(s: Any, cache: dict) -> Step:
    from lmforge.data.filters import LineJunk

    return LineJunk(require_terminal_punct=s.require_punct)


def _langid(s: Any, cache: dict) -> Step:
    from lmforge.data.langid import LanguageId

    return LanguageId(s.langs, s.min_score, s.thresholds, mixed=s.mixed, mixed_min_share=s.mixed_min_share)


def _cjk_normalize(s: Any, cache: dict) -> Step:
    from lmforge.data.cjk import CjkNormalize

    return CjkNormalize(s.width, s.zh_convert)


def _gopher_repetition(s: Any, cache: dict) -> Step:
    from lmforge.data.filters import GopherRepetition

    return GopherRepetition(
        max_dup_line_frac=s.max_dup_line_frac, max_dup_para_frac=s.max_dup_para_frac,
        max_dup_line_char_frac=s.max_dup_line_char_frac, max_dup_para_char_frac=s.max_dup_para_char_frac,
        top_ngram_fracs=tuple(s.top_ngram_fracs), dup_ngram_fracs=tuple(s.dup_ngram_fracs),
        word_split=s.word_split, profiles=_profiles(s, cache))


def _gopher_quality(s: Any, cache: dict) -> Step:
    from lmforge.data.filters import GopherQuality

    return GopherQuality(
        min_words=s.min_words, max_words=s.max_words, min_mean_word_length=s.min_mean_word_length,
        max_mean_word_length=s.max_mean_word_length, max_symbol_word_ratio=s.max_symbol_word_ratio,
        max_bullet_lines_frac=s.max_bullet_lines_frac, max_ellipsis_lines_frac=s.max_ellipsis_lines_frac,
        min_alpha_words_frac=s.min_alpha_words_frac, min_stop_words=s.min_stop_words, word_split=s.word_split,
        profiles=_profiles(s, cache))


def _c4_quality(s: Any, cache: dict) -> Step:
    from lmforge.data.filters import C4Quality

    return C4Quality(min_sentences=s.min_sentences, filter_curly_bracket=s.curly_bracket, word_split=s.word_split,
                     profiles=_profiles(s, cache))


def _fineweb_quality(s: Any, cache: dict) -> Step:
    from lmforge.data.filters import FineWebQuality

    return FineWebQuality(word_split=s.word_split, profiles=_profiles(s, cache))


def _toxicity(s: Any, cache: dict) -> Step:
    from lmforge.data.toxicity import Toxicity

    return Toxicity(s.max_badword_ratio, s.max_toxicity, s.classifier)


def _quality(s: Any, cache: dict) -> Step:
    from lmforge.data.quality import QualityScore

    return QualityScore(s.model, s.threshold)


def _pii_redact(s: Any, cache: dict) -> Step:
    from lmforge.data.pii import PiiRedact

    return PiiRedact(s.kinds or None)


def _domain_tag(s: Any, cache: dict) -> Step:
    from lmforge.data.mixing import DEFAULT_HOST_RULES, DomainTag

    hosts = dict(s.hosts)  # the step's rules are tried first
    for suffix, domain in DEFAULT_HOST_RULES.items():
        hosts.setdefault(suffix, domain)
    return DomainTag(hosts)


STEPS: dict[str, StepDef] = {d.name: d for d in [
    StepDef("html_extract", 1, "shard", "HTML pages → main-content text (other documents pass unchanged).",
            {"extractor": "extractor", "main_content": "main_content", "timeout": "extract_timeout"}, _html_extract),
    StepDef("unicode_normalize", 1, "shard", "Fix mojibake, NFC, drop control characters, normalise line ends.",
            {}, _unicode_normalize),
    StepDef("line_junk", 1, "shard", "Remove navigation / cookie / 'read more' / symbol-heavy lines.",
            {"require_punct": "line_junk_require_punct"}, _line_junk),
    StepDef("langid", 1, "shard", "Identify the language (fastText lid.176): meta.lang, meta.lang_score.",
            {"langs": "langs", "min_score": "lang_min_score", "thresholds": "lang_thresholds", "mixed": "mixed_langs",
             "mixed_min_share": "mixed_min_share"}, _langid),
    StepDef("cjk_normalize", 1, "shard", "Full-width / half-width forms; Chinese script conversion (OpenCC).",
            {"width": "width_normalize", "zh_convert": "zh_convert"}, _cjk_normalize),
    StepDef("gopher_repetition", 2, "shard", "Gopher's repeated lines / paragraphs / n-grams filter.",
            {k: k for k in ("max_dup_line_frac", "max_dup_para_frac", "max_dup_line_char_frac",
                            "max_dup_para_char_frac", "top_ngram_fracs", "dup_ngram_fracs")} | PROFILED,
            _gopher_repetition),
    StepDef("gopher_quality", 2, "shard", "Gopher's quality rules (word counts and lengths, symbols, stop words).",
            {k: k for k in ("min_words", "max_words", "min_mean_word_length", "max_mean_word_length",
                            "max_symbol_word_ratio", "max_bullet_lines_frac", "max_ellipsis_lines_frac",
                            "min_alpha_words_frac", "min_stop_words")} | PROFILED, _gopher_quality),
    StepDef("c4_quality", 2, "shard", "C4's line and document rules (removes lines from the text).",
            {"min_sentences": "c4_min_sentences", "curly_bracket": "c4_curly_bracket"} | PROFILED, _c4_quality),
    StepDef("fineweb_quality", 2, "shard", "FineWeb's quality rules (punctuation, short lines, duplicates, lists).",
            dict(PROFILED), _fineweb_quality),
    StepDef("toxicity", 1, "shard", "Score offensive language and drop above the thresholds.",
            {"max_badword_ratio": "max_badword_ratio", "max_toxicity": "max_toxicity",
             "classifier": "toxicity_classifier"}, _toxicity),
    StepDef("quality", 1, "shard", "Score every document with a model from `lmforge data train-quality`.",
            {"model": (str, Field(description="Folder of a model from `lmforge data train-quality` (meta.quality).")),
             "threshold": "quality_threshold"}, _quality),
    StepDef("pii_redact", 1, "shard", "Redact e-mails, phones, IP addresses, card numbers, Chinese ID numbers.",
            {"kinds": "pii_kinds"}, _pii_redact),
    StepDef("domain_tag", 1, "shard", "Tag documents with meta.domain (URL-host rules, then keyword rules).",
            {"hosts": "domain_hosts"}, _domain_tag),
    StepDef("line_dedup", 1, "corpus", "Remove lines (or paragraphs) repeated across many documents (CCNet-style).",
            {"unit": "line_dedup_unit", "max_docs": "line_dedup_max_docs", "min_words": "line_dedup_min_words"}),
    StepDef("exact_dedup", 1, "corpus", "Drop exact duplicates (after normalising case, punctuation, whitespace); "
                                        "the first copy in input order wins.", {}),
    StepDef("minhash_dedup", 1, "corpus", "Drop near-duplicates (MinHash-LSH across all shards).",
            {"ngram": "minhash_ngram", "bands": "minhash_bands", "rows": "minhash_rows",
             "threshold": "minhash_threshold"}),
    StepDef("select", 1, "corpus", "Keep only the top fraction of the corpus by a meta score.",
            {"top_fraction": (float, Field(gt=0, le=1, description="Keep only this top fraction of the corpus by "
                                                                   "meta.<score> (e.g. 0.3).")),
             "score": "select_score"}),
    StepDef("mix", 1, "corpus", "Resample the corpus to target shares per domain or language.",
            {"by": "mix_by",
             "targets": (dict[str, float], Field(min_length=1, description="Target share per domain or language, "
                                                                           "e.g. {en: 0.7, zh: 0.3}; '*' covers "
                                                                           "the rest.")),
             "max_repeat": "mix_max_repeat"}),
]}
DEDUP_ORDER = ("line_dedup", "exact_dedup", "minhash_dedup")
SELECT_ORDER = ("select", "mix")
CORPUS_ORDER = DEDUP_ORDER + SELECT_ORDER


@functools.lru_cache(maxsize=None)
def settings_model(name: str) -> type[StepSettings]:
    """The pydantic model of one step's settings (built from the flat config's fields it mirrors)."""
    from lmforge.data.stage import Config

    fields: dict[str, Any] = {}
    for key, src in STEPS[name].settings.items():
        if isinstance(src, str):
            flat = Config.model_fields[src]
            fields[key] = (flat.annotation, Field(**{**_field_kwargs(flat)}))
        else:
            fields[key] = src
    return create_model(f"{name.title().replace('_', '')}Settings", __base__=StepSettings, **fields)


def _field_kwargs(flat: Any) -> dict[str, Any]:
    """A flat field's default, description and constraints, to declare the same field in a step's model."""
    kw: dict[str, Any] = {"description": flat.description}
    if flat.default_factory is not None:
        kw["default_factory"] = flat.default_factory
    else:
        kw["default"] = flat.default
    for m in flat.metadata:  # annotated_types constraints (ge, le, gt, ...)
        for attr in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            if getattr(m, attr, None) is not None:
                kw[attr] = getattr(m, attr)
    return kw


def owner_of(flat: str) -> str | None:
    """The step whose setting mirrors a flat config field (None for a switch such as ``line_junk``)."""
    return next((d.name for d in STEPS.values() if flat in d.settings.values()), None)


def step_fields() -> set[str]:
    """The flat config fields that are a step's setting or switch (every field but the run-wide ones)."""
    from lmforge.data.stage import RUN_FIELDS, Config

    return set(Config.model_fields) - RUN_FIELDS


@dataclass
class StepSpec:
    """One entry of a pipeline: a registered step with its validated settings."""

    name: str
    settings: BaseModel

    @property
    def definition(self) -> StepDef:
        return STEPS[self.name]

    @property
    def full_name(self) -> str:
        return self.definition.full_name

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.name, "version": self.definition.version, **self.settings.model_dump()}

    def build(self, cache: dict | None = None) -> Step:
        build = self.definition.build
        if build is None:
            raise TypeError(f"{self.name} is a corpus-wide step: the executor runs it, it has no per-document form")
        return build(self.settings, {} if cache is None else cache)


class PipelineError(ValueError):
    """A pipeline list that does not validate; the message names the entry (``[3].min_wrds``) and the problem."""


def parse_step(i: int, item: Any) -> StepSpec:
    """One list entry → a :class:`StepSpec`; errors start with ``[i]`` (the caller prefixes where the list is)."""
    if not isinstance(item, dict) or "step" not in item:
        raise PipelineError(f"[{i}]: expected a mapping with a 'step' key (e.g. {{step: exact_dedup}}), "
                            f"got {item!r}")
    data = dict(item)
    name, version = data.pop("step"), data.pop("version", None)
    if isinstance(name, str) and name not in STEPS:  # a versioned name from a manifest: gopher_quality_v2
        base, _, v = name.rpartition("_v")
        if base in STEPS and v.isdigit():
            name, version = base, int(v) if version is None else version
    if name not in STEPS:
        raise PipelineError(f"[{i}].step: unknown step {name!r} (known: {', '.join(STEPS)})")
    d = STEPS[name]
    if version is not None and version != d.version:
        raise PipelineError(f"[{i}].version: this lmforge has {name} version {d.version}, the pipeline pins "
                            f"version {version} (drop the pin or use the matching lmforge)")
    model = settings_model(name)
    try:
        settings = model.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            known = ", ".join(model.model_fields) or "none"
            raise PipelineError(f"[{i}].{key}: unknown field of {name} (its fields: {known})") from None
        raise PipelineError(f"[{i}].{key}: {e['msg']} ({name})") from None
    return StepSpec(name, settings)


def parse_pipeline(items: list[Any]) -> list[StepSpec]:
    """Validate a pipeline list: every entry, then the order (see :func:`phases`)."""
    specs = [parse_step(i, item) for i, item in enumerate(items)]
    phases(specs)
    return specs


@dataclass
class Phases:
    """A pipeline cut into what the executors run: per-shard steps, the corpus-wide dedup passes, per-shard steps in
    the pass that applies them, then selection and mixing."""

    shard: list[StepSpec]
    line_dedup: Any = None  # LineDedupParams
    exact_dedup: bool = False
    minhash: Any = None  # MinHashParams
    after_dedup: list[StepSpec] = field(default_factory=list)
    select: Any = None  # MixSpec (inactive when neither select nor mix is in the list)


def phases(specs: list[StepSpec]) -> Phases:
    """Check the order of a pipeline and split it into :class:`Phases`; an order the executors cannot run is a
    :class:`PipelineError` naming the entry."""
    from lmforge.data.linededup import LineDedupParams
    from lmforge.data.minhash import MinHashParams
    from lmforge.data.mixing import MixSpec

    out = Phases(shard=[])
    seen: dict[str, int] = {}
    for i, s in enumerate(specs):
        d = s.definition
        if d.kind == "corpus":
            if d.name in seen:
                raise PipelineError(f"[{i}].step: {d.name} is already at [{seen[d.name]}] (a corpus-wide step runs "
                                    f"once)")
            later = [n for n in seen if CORPUS_ORDER.index(n) > CORPUS_ORDER.index(d.name)]
            if later:
                raise PipelineError(f"[{i}].step: {d.name} must come before {later[0]} (at [{seen[later[0]]}]): "
                                    f"corpus-wide steps run in the order {' → '.join(CORPUS_ORDER)}")
            if d.name in DEDUP_ORDER and out.after_dedup:
                k = specs.index(out.after_dedup[0])
                raise PipelineError(f"[{i}].step: {d.name} comes after the per-shard step {specs[k].name} (at [{k}]) "
                                    f"that follows a dedup step; the dedup steps run together, so per-shard steps "
                                    f"go before them all or after them all")
            seen[d.name] = i
            st = s.settings
            if d.name == "line_dedup":
                out.line_dedup = LineDedupParams(st.unit, st.max_docs, st.min_words)
            elif d.name == "exact_dedup":
                out.exact_dedup = True
            elif d.name == "minhash_dedup":
                out.minhash = MinHashParams(st.ngram, st.bands, st.rows, threshold=st.threshold)
        else:
            if any(n in SELECT_ORDER for n in seen):
                first = min(seen[n] for n in SELECT_ORDER if n in seen)
                raise PipelineError(f"[{i}].step: {d.name} is a per-shard step after {specs[first].name} (at "
                                    f"[{first}]); per-shard steps come before select and mix")
            if d.name == "cjk_normalize" and s.settings.zh_convert != "none" \
                    and not any(p.name == "langid" for p in specs[:i]):
                raise PipelineError(f"[{i}].zh_convert: needs a langid step before it to find the Chinese documents")
            (out.after_dedup if seen else out.shard).append(s)
    sel = next((s.settings for s in specs if s.name == "select"), None)
    mix = next((s.settings for s in specs if s.name == "mix"), None)
    if mix is not None and mix.by == "domain" and not any(s.name == "domain_tag" for s in specs):
        at = next(i for i, s in enumerate(specs) if s.name == "mix")
        raise PipelineError(f"[{at}].by: mixing by domain needs a domain_tag step before it")
    out.select = MixSpec(top_fraction=sel.top_fraction if sel else None, score_key=sel.score if sel else "quality",
                         by=mix.by if mix else "domain", targets=dict(mix.targets) if mix else {},
                         max_repeat=mix.max_repeat if mix else 1.0)
    return out


def build_shard_steps(items: list[dict[str, Any]]) -> list[Step]:
    """The :class:`Step` objects of per-shard entries (plain dicts, so a worker process can rebuild them)."""
    cache: dict = {}
    return [parse_step(i, item).build(cache) for i, item in enumerate(items)]


# ----------------------------------------------------------------------------------------------------------------------
# the flat config as a preset


def _spec(name: str, **settings: Any) -> StepSpec:
    return StepSpec(name, settings_model(name).model_validate(settings))


def preset_pipeline(c: "Config") -> list[StepSpec]:
    """The pipeline a flat config (today's switches) means, in the data stage's fixed order."""
    profiled = {"word_split": c.word_split, "lang_profiles": c.lang_profiles and c.langid,
                "lang_profiles_file": c.lang_profiles_file}
    specs = [_spec("html_extract", extractor=c.extractor, main_content=c.main_content, timeout=c.extract_timeout),
             _spec("unicode_normalize")]
    if c.line_junk:
        specs.append(_spec("line_junk", require_punct=c.line_junk_require_punct))
    if c.langid:
        specs.append(_spec("langid", langs=c.langs, min_score=c.lang_min_score, thresholds=c.lang_thresholds,
                           mixed=c.mixed_langs, mixed_min_share=c.mixed_min_share))
    if c.width_normalize or c.zh_convert != "none":
        if c.zh_convert != "none" and not c.langid:
            raise ValueError("zh_convert needs language ID (langid: true) to find the Chinese documents")
        specs.append(_spec("cjk_normalize", width=c.width_normalize, zh_convert=c.zh_convert))
    if c.gopher_repetition:
        specs.append(_spec("gopher_repetition", **{k: getattr(c, k) for k in STEPS["gopher_repetition"].settings
                                                   if k not in profiled}, **profiled))
    if c.gopher_quality:
        specs.append(_spec("gopher_quality", **{k: getattr(c, k) for k in STEPS["gopher_quality"].settings
                                                if k not in profiled}, **profiled))
    if c.c4_quality:
        specs.append(_spec("c4_quality", min_sentences=c.c4_min_sentences, curly_bracket=c.c4_curly_bracket,
                           **profiled))
    if c.fineweb_quality:
        specs.append(_spec("fineweb_quality", **profiled))
    if c.toxicity:
        specs.append(_spec("toxicity", max_badword_ratio=c.max_badword_ratio, max_toxicity=c.max_toxicity,
                           classifier=c.toxicity_classifier))
    if c.quality_model:
        specs.append(_spec("quality", model=c.quality_model, threshold=c.quality_threshold))
    if c.pii:
        specs.append(_spec("pii_redact", kinds=c.pii_kinds))
    if c.domains or (c.mix_by == "domain" and c.mix_targets):
        specs.append(_spec("domain_tag", hosts=c.domain_hosts))
    if c.line_dedup:
        specs.append(_spec("line_dedup", unit=c.line_dedup_unit, max_docs=c.line_dedup_max_docs,
                           min_words=c.line_dedup_min_words))
    if c.dedup:
        specs.append(_spec("exact_dedup"))
    if c.minhash:
        specs.append(_spec("minhash_dedup", ngram=c.minhash_ngram, bands=c.minhash_bands, rows=c.minhash_rows,
                           threshold=c.minhash_threshold))
    if c.top_fraction is not None:
        specs.append(_spec("select", top_fraction=c.top_fraction, score=c.select_score))
    if c.mix_targets:
        specs.append(_spec("mix", by=c.mix_by, targets=c.mix_targets, max_repeat=c.mix_max_repeat))
    return specs


def resolve(c: "Config") -> list[StepSpec]:
    """The pipeline of a data config: its ``pipeline`` list, else the flat switches' preset."""
    return parse_pipeline(c.pipeline) if c.pipeline is not None else preset_pipeline(c)


def to_yaml(specs: list[StepSpec], defaults: bool = False) -> str:
    """The list as YAML (``pipeline:`` and one flow mapping per step), settings left at their default omitted unless
    ``defaults``; what ``lmforge data pipeline`` prints, ready to paste into a config."""
    import yaml

    lines = ["pipeline:"]
    for s in specs:
        d = s.settings.model_dump(exclude_defaults=not defaults)
        entry = {"step": s.name, **d}
        text = yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, allow_unicode=True, width=10_000)
        lines.append(f"  - {text.strip()}  # v{s.definition.version}: {s.definition.summary}")
    return "\n".join(lines) + "\n"


def show(config: "Config") -> None:
    """Print the pipeline list a data config means (its ``pipeline``, else the preset of its flags) as YAML; settings
    left at their defaults are omitted."""
    print(to_yaml(resolve(config)), end="")
