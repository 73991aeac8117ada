"""LLM-based scoring (the paper's (a)) and its LLM repetition judge, with any local causal LM.

For each sample: (1) the domain prompt asks for one of the domains (the keys of
`scorer.quality.thresholds`: general, mathematics, programming, disciplinary by default);
(2) that domain's prompt asks for a quality score 0-10, flagged below the domain's threshold
(7 by default); (3) the repetition judge asks for 0 (nothing but repetition) .. 10 (none),
flagged below `repetition_judge.threshold` (3). Quality scoring runs on text-only samples
(the paper: open MLLMs cannot yet score multimodal data), the judge on all samples, each
configurable. Generation is greedy and batched (left padding); the model is loaded with
`local_files_only=True`, so nothing is downloaded.

Parsing policy: a domain is the first domain name in the answer; none found -> `general`
(or the first domain) and counted as `domain` unparsable. A score is the first number in the
answer; none, or one outside [0, 10] -> counted as `quality`/`repetition` unparsable, and the
sample is kept (`scorer.unparsable: keep`, the default) or sent to review with the raw answer
as evidence (`flag`). A model answer never stops the run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from megatron_internvl.config.data import DatasetSpec
from .chunks import is_blank, read_lines
from .records import SampleView, Unreadable, read_view
from .settings import ScorerSettings

DOMAIN_PROMPT = (
    "You sort training data for a language model. Decide which one of these domains the sample "
    "below belongs to: {domains}. Reply with the domain name only.\n\n"
    "Sample:\n{text}\n\nDomain:")

_CRITERIA = {
    "general": "helpfulness, factual accuracy, coherence and fluent, natural language",
    "mathematics": "correct mathematics, complete and valid reasoning steps, a correct final answer, "
                   "clear notation",
    "programming": "correct code that would run, a solution that answers the task, readable code and an "
                   "accurate explanation",
    "disciplinary": "accuracy of the subject matter, depth and precision of the explanation, correct use "
                    "of the field's terms",
}
QUALITY_PROMPT = (
    "You judge the quality of training data for a language model. The sample below is from the "
    "{domain} domain. Judge it by {criteria}. Give a score from 0 (useless or wrong) to 10 "
    "(excellent). Reply with the number only.\n\nSample:\n{text}\n\nScore:")
REPETITION_PROMPT = (
    "You check training data for a language model. Does the text below repeat itself: the same "
    "words, sentences or passages again and again, or a loop at its end? Give a score from 0 "
    "(almost all of it is repetition) to 10 (no repetition at all). Reply with the number only."
    "\n\nText:\n{text}\n\nScore:")

_NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(?!\w)")


def parse_score(output: str) -> Optional[float]:
    """The first number of a model answer if it lies in [0, 10], else None (unparsable)."""
    m = _NUMBER.search(output or "")
    if m is None:
        return None
    value = float(m.group(1))
    return value if 0 <= value <= 10 else None


def parse_domain(output: str, domains: list[str]) -> Optional[str]:
    text = (output or "").lower()
    best = None
    for d in domains:
        m = re.search(rf"\b{re.escape(d.lower())}\b", text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), d)
    return best[1] if best else None


def sample_text(view: SampleView, limit: int) -> str:
    """What the scorer reads: the conversation as User/Assistant lines, or the document."""
    names = {"system": "System", "user": "User", "assistant": "Assistant", "rejected": None, "document": None}
    parts = []
    for f in view.fields:
        label = names.get(f.role)
        if f.role == "rejected":
            continue
        parts.append(f"{label}: {f.text}" if label else f.text)
    text = "\n".join(parts)
    return text if len(text) <= limit else text[:limit] + " [...]"


@dataclass
class ScoreResult:
    domain: Optional[str] = None
    quality: Optional[float] = None
    repetition: Optional[float] = None
    outputs: dict = field(default_factory=dict)
    unparsable: list[str] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)


class LLMScorer:
    """Prompts, batching and parsing; `generate` is the only part that touches the model."""

    def __init__(self, model, tokenizer, settings: ScorerSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.domains = list(settings.quality.thresholds)

    def prompt(self, text: str) -> str:
        """The text given to the model for one instruction: the tokenizer's chat template if it
        has one, else the instruction as it is."""
        tok = self.tokenizer
        if tok is not None and getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return text

    def generate(self, prompts: list[str]) -> list[str]:
        import torch

        tok, s = self.tokenizer, self.settings
        out: list[str] = []
        for i in range(0, len(prompts), s.batch_size):
            batch = prompts[i:i + s.batch_size]
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(self.model.device) for k, v in enc.items()}
            with torch.no_grad():
                ids = self.model.generate(**enc, max_new_tokens=s.max_new_tokens, do_sample=False,
                                          pad_token_id=tok.pad_token_id)
            new = ids[:, enc["input_ids"].shape[1]:]
            out += tok.batch_decode(new, skip_special_tokens=True)
        return out

    def threshold(self, domain: str) -> float:
        t = self.settings.quality.thresholds
        return t.get(domain, t.get("general", min(t.values())))

    def score(self, items: list[tuple[str, bool]]) -> list[ScoreResult]:
        """Score (text, multimodal) pairs; three batched passes over the model at most."""
        s = self.settings
        results = [ScoreResult() for _ in items]
        quality = [i for i, (_, mm) in enumerate(items) if s.quality.enabled and (s.quality.multimodal or not mm)]
        judge = [i for i, (_, mm) in enumerate(items)
                 if s.repetition_judge.enabled and (s.repetition_judge.multimodal or not mm)]
        if quality:
            answers = self.generate([self.prompt(DOMAIN_PROMPT.format(domains=", ".join(self.domains),
                                                                      text=items[i][0])) for i in quality])
            for i, a in zip(quality, answers):
                r = results[i]
                r.outputs["domain"] = a
                r.domain = parse_domain(a, self.domains)
                if r.domain is None:
                    r.unparsable.append("domain")
                    r.domain = "general" if "general" in self.domains else self.domains[0]
            prompts = [self.prompt(QUALITY_PROMPT.format(
                domain=results[i].domain, criteria=_CRITERIA.get(results[i].domain, _CRITERIA["general"]),
                text=items[i][0])) for i in quality]
            for i, a in zip(quality, self.generate(prompts)):
                r = results[i]
                r.outputs["quality"] = a
                r.quality = parse_score(a)
                t = self.threshold(r.domain)
                if r.quality is None:
                    r.unparsable.append("quality")
                    if s.unparsable == "flag":
                        r.findings.append({"rule": "scorer.unparsable", "stage": "quality", "output": a[:200]})
                elif r.quality < t:
                    r.findings.append({"rule": "scorer.quality", "domain": r.domain, "score": r.quality,
                                       "threshold": t, "output": a[:200]})
        if judge:
            prompts = [self.prompt(REPETITION_PROMPT.format(text=items[i][0])) for i in judge]
            for i, a in zip(judge, self.generate(prompts)):
                r = results[i]
                r.outputs["repetition"] = a
                r.repetition = parse_score(a)
                t = s.repetition_judge.threshold
                if r.repetition is None:
                    r.unparsable.append("repetition")
                    if s.unparsable == "flag":
                        r.findings.append({"rule": "scorer.unparsable", "stage": "repetition", "output": a[:200]})
                elif r.repetition < t:
                    r.findings.append({"rule": "scorer.repetition", "score": r.repetition, "threshold": t,
                                       "output": a[:200]})
        return results


def load_scorer(model_dir: str, settings: ScorerSettings) -> LLMScorer:
    """A local model folder (config, weights, tokenizer) with transformers; never downloads."""
    import os

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--scorer {model_dir}: not a folder; pass a local model folder saved with "
                                f"save_pretrained (config.json, weights, tokenizer files).")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise RuntimeError("--scorer needs transformers: pip install 'transformers>=5'.") from e
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"--scorer {model_dir}: the tokenizer has neither a pad nor an eos token; "
                             f"set pad_token in its tokenizer_config.json.")
        tok.pad_token = tok.eos_token
    device = settings.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.to(device).eval()
    return LLMScorer(model, tok, settings)


SCORER_RULES = ("scorer.quality", "scorer.repetition", "scorer.unparsable")


def score_chunk(scorer: LLMScorer, spec: DatasetSpec, start: int, end: int, first_line: int, skip: set[int],
                out, flag_line) -> dict:
    """Score the samples of a chunk that no rule flagged; write the flagged ones to `out`."""
    s = scorer.settings
    counts = {r: {"seen": 0, "flagged": 0} for r in SCORER_RULES}
    unparsable: dict[str, int] = {}
    domains: dict[str, int] = {}
    seen = flagged = 0
    pending: list[tuple[int, bytes, str, bool]] = []

    def flush():
        nonlocal flagged
        results = scorer.score([(text, mm) for _, _, text, mm in pending])
        for (line_no, raw, _, mm), r in zip(pending, results):
            if r.outputs.get("quality") is not None:
                counts["scorer.quality"]["seen"] += 1
                domains[r.domain] = domains.get(r.domain, 0) + 1
            if r.outputs.get("repetition") is not None:
                counts["scorer.repetition"]["seen"] += 1
            if r.outputs:
                counts["scorer.unparsable"]["seen"] += 1
            for u in r.unparsable:
                unparsable[u] = unparsable.get(u, 0) + 1
            rules = {f["rule"] for f in r.findings}
            for rule in rules:
                counts[rule]["flagged"] += 1
            if r.findings:
                flagged += 1
                out.write(flag_line(line_no, raw, r.findings))
        pending.clear()

    line_no = first_line - 1
    for raw in read_lines(spec.annotation, start, end):
        line_no += 1
        if is_blank(raw) or line_no in skip:
            continue
        try:
            view = read_view(raw, spec.kind, spec.text_field)
        except Unreadable:
            continue
        seen += 1
        pending.append((line_no, raw, sample_text(view, s.max_text_chars), view.multimodal))
        if len(pending) >= 4 * s.batch_size:
            flush()
    if pending:
        flush()
    if s.unparsable != "flag":
        del counts["scorer.unparsable"]
    return {"seen": seen, "flagged": flagged, "rules": counts, "unparsable": unparsable, "domains": domains}
