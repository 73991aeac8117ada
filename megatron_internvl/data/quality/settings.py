"""The rules file: one dataclass per rule, loaded from YAML (examples/filter/rules.yaml).

Every rule has `enabled` and its thresholds; a file only needs the keys it changes. Unknown
keys are refused with the list of known ones, so a typo never silently keeps a default.
The defaults are documented in docs/data.md ("Filtering a mixture") and in the shipped file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional


class RulesError(ValueError):
    """The rules file is unreadable or sets an unknown or invalid option."""


@dataclass
class LengthRule:
    """Sample and turn lengths (characters) far outside the dataset's own distribution. User
    turns are left to `prompt_length`: neither checked here nor counted in the sample's length."""

    enabled: bool = True
    upper_quantile: float = 0.99
    upper_factor: float = 3.0       # flag above upper_factor x quantile(upper_quantile)
    lower_quantile: float = 0.01
    lower_factor: float = 0.1       # flag below lower_factor x quantile(lower_quantile)
    min_samples: int = 200          # fewer samples in a dataset: no distribution, rule not run
    sample_size: int = 20000        # bounded-memory uniform sample the quantiles come from


@dataclass
class PromptLengthRule:
    """User turns (prompts, questions) far longer than the dataset's own: off by default, since a
    prompt is not what the model learns to produce (a pasted document is a fine prompt). Uses the
    length rule's distribution and `upper_quantile`; there is no lower limit."""

    enabled: bool = False
    upper_factor: float = 10.0      # flag a user turn above upper_factor x quantile(upper_quantile) of user turns


@dataclass
class CharRunRule:
    """A long run of one character (e.g. zeros). Characters used for rulers, leaders and
    underlines (`ignore_chars`) may run longer: up to `max_ruler_run`, whitespace without limit."""

    enabled: bool = True
    max_run: int = 24
    ignore_chars: str = "-=_*.#~ \t\n"
    max_ruler_run: int = 200        # a run of a non-whitespace ignore_char longer than this is flagged; 0: never


@dataclass
class TokenRunRule:
    """The same word or number repeated many times in a row ("0 0 0 0 ...", "the the the")."""

    enabled: bool = True
    max_run: int = 10


@dataclass
class DuplicateLinesRule:
    """Share of lines (long enough to matter) that repeat an earlier line of the same text."""

    enabled: bool = True
    max_share: float = 0.3
    min_duplicates: int = 3
    min_line_chars: int = 20


@dataclass
class EmptyAnswerRule:
    """An assistant turn (or chosen / rejected answer) that is empty or only whitespace."""

    enabled: bool = True


@dataclass
class FormattingRule:
    """Formatting that breaks the template: odd code fences, stray template tokens, open tags."""

    enabled: bool = True
    code_fences: bool = True
    stray_tokens: list[str] = field(default_factory=lambda: [
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>"])
    tag_pairs: list[list[str]] = field(default_factory=lambda: [
        ["<ref>", "</ref>"], ["<box>", "</box>"], ["<quad>", "</quad>"]])


@dataclass
class PlaceholderRule:
    """`<image>` / `<video>` placeholders that do not match the sample's images (as the trainer
    counts them), or a placeholder inside an answer."""

    enabled: bool = True


@dataclass
class UnreadableRule:
    """A line the trainer would skip: not JSON, or not a sample of the dataset's kind."""

    enabled: bool = True


@dataclass
class NgramRepetition:
    """Word n-grams repeating within one answer: the share of n-gram positions repeating an
    earlier n-gram, or the share of the words covered by the most frequent n-gram alone."""

    enabled: bool = True
    n: int = 4
    max_share: float = 0.5
    max_top_coverage: float = 0.5
    min_count: int = 4              # the most frequent n-gram must occur at least this often
    min_tokens: int = 30


@dataclass
class SentenceRepetition:
    """Sentences / lines repeated within one answer."""

    enabled: bool = True
    max_share: float = 0.3
    min_duplicates: int = 3
    min_chars: int = 12


@dataclass
class LoopRepetition:
    """One span of words written many times in a row, anywhere in the answer (a generation
    loop); at the end of the answer the last copy may be cut mid-span or mid-word."""

    enabled: bool = True
    max_period: int = 64            # longest span looked for, in words
    min_repeats: float = 3.0        # copies needed by a loop that ends the answer (a model stopped by its limit)
    min_repeats_inside: float = 4.0  # copies needed by a loop followed by more text
    min_tokens: int = 16            # the loop must cover at least this many words


@dataclass
class CompressionRepetition:
    """zlib compressed / raw size of the answer; very low means very repetitive text."""

    enabled: bool = True
    min_ratio: float = 0.12
    min_chars: int = 800


@dataclass
class RepetitionRules:
    """Repetition detection on the supervised text: assistant turns, a preference pair's chosen
    answer, all text of pre-training data and corpora."""

    ngram: NgramRepetition = field(default_factory=NgramRepetition)
    sentences: SentenceRepetition = field(default_factory=SentenceRepetition)
    loop: LoopRepetition = field(default_factory=LoopRepetition)
    compression: CompressionRepetition = field(default_factory=CompressionRepetition)


@dataclass
class QualityScoring:
    """The paper's (a): classify the domain, then score 0-10 with the domain's prompt."""

    enabled: bool = True
    multimodal: bool = False        # the paper scores text data only
    thresholds: dict[str, float] = field(default_factory=lambda: {
        "general": 7, "mathematics": 7, "programming": 7, "disciplinary": 7})


@dataclass
class RepetitionJudge:
    """The paper's LLM repetition judge: 0 (pure repetition) .. 10 (none); flag below threshold."""

    enabled: bool = True
    multimodal: bool = True
    threshold: float = 3


@dataclass
class ScorerSettings:
    """Used only with --scorer MODEL_DIR."""

    batch_size: int = 8
    max_new_tokens: int = 8
    max_text_chars: int = 4000      # the sample text shown to the model is cut to this
    device: str = "auto"            # auto | cpu | cuda
    # What an unparsable model answer does: "keep" (counted in the report) or "flag" (reviewed).
    unparsable: str = "keep"
    exempt_datasets: list[str] = field(default_factory=list)
    quality: QualityScoring = field(default_factory=QualityScoring)
    repetition_judge: RepetitionJudge = field(default_factory=RepetitionJudge)


@dataclass
class HeuristicRules:
    length: LengthRule = field(default_factory=LengthRule)
    prompt_length: PromptLengthRule = field(default_factory=PromptLengthRule)
    char_run: CharRunRule = field(default_factory=CharRunRule)
    token_run: TokenRunRule = field(default_factory=TokenRunRule)
    duplicate_lines: DuplicateLinesRule = field(default_factory=DuplicateLinesRule)
    empty_answer: EmptyAnswerRule = field(default_factory=EmptyAnswerRule)
    formatting: FormattingRule = field(default_factory=FormattingRule)
    placeholders: PlaceholderRule = field(default_factory=PlaceholderRule)
    unreadable: UnreadableRule = field(default_factory=UnreadableRule)


@dataclass
class FilterSettings:
    heuristics: HeuristicRules = field(default_factory=HeuristicRules)
    repetition: RepetitionRules = field(default_factory=RepetitionRules)
    scorer: ScorerSettings = field(default_factory=ScorerSettings)
    # Input is cut into chunks of about this many MiB: the unit of parallel work and of resume.
    chunk_mb: float = 64.0

    def fingerprint(self) -> str:
        """Hash of every setting: outputs made with other settings are never resumed."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def validate(self) -> None:
        h, r, s = self.heuristics, self.repetition, self.scorer
        checks = [
            (0 < h.length.upper_quantile <= 1, "heuristics.length.upper_quantile must be in (0, 1]"),
            (0 <= h.length.lower_quantile < 1, "heuristics.length.lower_quantile must be in [0, 1)"),
            (h.length.upper_factor >= 1, "heuristics.length.upper_factor must be >= 1"),
            (0 <= h.length.lower_factor <= 1, "heuristics.length.lower_factor must be in [0, 1]"),
            (h.length.sample_size >= 100, "heuristics.length.sample_size must be >= 100"),
            (h.prompt_length.upper_factor >= 1, "heuristics.prompt_length.upper_factor must be >= 1"),
            (h.char_run.max_run >= 2, "heuristics.char_run.max_run must be >= 2"),
            (h.char_run.max_ruler_run >= 0, "heuristics.char_run.max_ruler_run must be >= 0 (0: never)"),
            (h.token_run.max_run >= 2, "heuristics.token_run.max_run must be >= 2"),
            (0 < h.duplicate_lines.max_share <= 1, "heuristics.duplicate_lines.max_share must be in (0, 1]"),
            (r.ngram.n >= 1, "repetition.ngram.n must be >= 1"),
            (0 < r.ngram.max_share <= 1, "repetition.ngram.max_share must be in (0, 1]"),
            (0 < r.ngram.max_top_coverage <= 1, "repetition.ngram.max_top_coverage must be in (0, 1]"),
            (0 < r.sentences.max_share <= 1, "repetition.sentences.max_share must be in (0, 1]"),
            (r.loop.max_period >= 1 and r.loop.min_repeats > 1 and r.loop.min_repeats_inside > 1,
             "repetition.loop needs max_period >= 1, min_repeats > 1 and min_repeats_inside > 1"),
            (0 < r.compression.min_ratio < 1, "repetition.compression.min_ratio must be in (0, 1)"),
            (s.unparsable in ("keep", "flag"), "scorer.unparsable must be 'keep' or 'flag'"),
            (s.device in ("auto", "cpu", "cuda"), "scorer.device must be auto, cpu or cuda"),
            (s.batch_size >= 1 and s.max_new_tokens >= 1, "scorer.batch_size and max_new_tokens must be >= 1"),
            (bool(s.quality.thresholds), "scorer.quality.thresholds needs at least one domain"),
            (self.chunk_mb > 0, "chunk_mb must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise RulesError(f"rules: {message}.")
        for pair in h.formatting.tag_pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) and t for t in pair)):
                raise RulesError(f"rules: heuristics.formatting.tag_pairs entry {pair!r} must be [open, close].")


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise RulesError(f"rules: {where or 'the file'} must be a mapping, got {type(data).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise RulesError(f"rules: unknown key(s) {sorted(unknown)} in {where or 'the file'}; known: {sorted(fields)}.")
    kwargs = {}
    defaults = cls()
    for name, value in data.items():
        default = getattr(defaults, name)
        at = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, at)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise RulesError(f"rules: {at} must be true or false, got {value!r}.")
            kwargs[name] = value
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RulesError(f"rules: {at} must be a number, got {value!r}.")
            if isinstance(default, int) and not float(value).is_integer():
                raise RulesError(f"rules: {at} must be a whole number, got {value!r}.")
            kwargs[name] = type(default)(value)
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise RulesError(f"rules: {at} must be a mapping, got {value!r}.")
            kwargs[name] = {str(k): float(v) for k, v in value.items()}
        elif isinstance(default, list):
            if not isinstance(value, list):
                raise RulesError(f"rules: {at} must be a list, got {value!r}.")
            kwargs[name] = value
        else:
            if not isinstance(value, str):
                raise RulesError(f"rules: {at} must be a string, got {value!r}.")
            kwargs[name] = value
    return cls(**kwargs)


def load_settings(path: Optional[str] = None, overrides: Optional[dict] = None) -> FilterSettings:
    """Defaults, then the YAML file at `path`, then `overrides` (a nested dict, for tests)."""
    import yaml

    data: dict = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise RulesError(f"rules file {path!r} cannot be read ({e}); pass --rules with an existing YAML file.") from e
        except yaml.YAMLError as e:
            raise RulesError(f"rules file {path}: not valid YAML ({e}).") from e
    if overrides:
        data = _merge(data, overrides)
    settings = _build(FilterSettings, data, "")
    settings.validate()
    return settings


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        # per-domain thresholds are one option: replaced, not merged
        if isinstance(v, dict) and k != "thresholds" and isinstance(out.get(k) or {}, dict):
            out[k] = _merge(out.get(k) or {}, v)
        else:
            out[k] = v
    return out
