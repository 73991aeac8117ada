"""The LLM scorer: a tiny random Qwen2 model saved and loaded offline, batched generation, the
paper-style prompts, score parsing with malformed model output, the pipeline's scorer step."""

from __future__ import annotations

import json
import os

import pytest

from megatron_internvl.data.quality.pipeline import read_flagged, run_filter
from megatron_internvl.data.quality.records import read_view
from megatron_internvl.data.quality.scorer import (LLMScorer, load_scorer, parse_domain, parse_score,
                                                   sample_text)
from megatron_internvl.data.quality.settings import load_settings

from .helpers import train_bpe, write_jsonl

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer Qwen2 causal LM with the data tests' BPE tokenizer, saved like a real one."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("scorer")
    tok = PreTrainedTokenizerFast(tokenizer_file=train_bpe(str(root / "bpe" / "tokenizer.json")),
                                  eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    plain, chat = str(root / "plain"), str(root / "chat")
    for folder in (plain, chat):
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    with open(os.path.join(chat, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc["chat_template"] = CHATML
    with open(os.path.join(chat, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)
    return plain, chat


def test_parse_score_and_domain():
    cases = {"8": 8.0, " 7.5 ": 7.5, "Score: 3/10": 3.0, "10": 10.0, "0 - useless": 0.0, "**9**": 9.0,
             "11": None, "-1": None, "seven": None, "": None, "v2 model": None, "1e5": None}
    assert {k: parse_score(k) for k in cases} == cases
    domains = ["general", "mathematics", "programming", "disciplinary"]
    assert parse_domain("Mathematics.", domains) == "mathematics"
    assert parse_domain("programming, not general", domains) == "programming"
    assert parse_domain("a banana", domains) is None
    assert parse_domain("mathematical", domains) is None


class Injected(LLMScorer):
    """Fixed model answers per prompt kind; records the prompts it was given."""

    def __init__(self, settings, answers: dict[str, list[str]]):
        super().__init__(None, None, settings)
        self.answers = {k: list(v) for k, v in answers.items()}
        self.prompts: list[str] = []

    def generate(self, prompts):
        self.prompts += prompts
        kind = "domain" if "Domain:" in prompts[0] else "quality" if "quality" in prompts[0] else "repetition"
        return [self.answers[kind].pop(0) for _ in prompts]


def test_prompts_thresholds_and_malformed_answers():
    s = load_settings(overrides={"scorer": {"quality": {"thresholds": {"general": 7, "mathematics": 8,
                                                                       "programming": 6, "disciplinary": 7}}}})
    texts = [("Solve 2x + 3 = 7. x = 2.", False), ("def f(): return 1", False), ("Hello there, friend.", False),
             ("What is a cell? A unit of life.", False), ("A cat on a mat.", True)]
    scorer = Injected(s.scorer, {
        "domain": ["Mathematics.", "programming", "I would say general", "a banana"],
        "quality": ["Score: 7.5/10", "6", "eleven", "11"],
        "repetition": ["10", "2", "", "9 out of 10", "-3"]})
    res = scorer.score(texts)
    assert [r.domain for r in res[:4]] == ["mathematics", "programming", "general", "general"]
    assert [r.quality for r in res] == [7.5, 6.0, None, None, None]
    assert [r.repetition for r in res] == [10.0, 2.0, None, 9.0, None]
    assert res[3].unparsable == ["domain", "quality"] and res[2].unparsable == ["quality", "repetition"]
    # 7.5 < 8 (mathematics) flags, 6 >= 6 (programming) does not; the judge's 2 < 3 flags
    assert [f["rule"] for f in res[0].findings] == ["scorer.quality"] and res[0].findings[0]["threshold"] == 8
    assert [f["rule"] for f in res[1].findings] == ["scorer.repetition"]
    assert res[2].findings == [] and res[4].findings == []     # unparsable: kept (default policy)
    # the multimodal sample got only the repetition judge (quality scoring is for text data)
    assert res[4].domain is None and "quality" not in res[4].outputs
    domain_prompts = [p for p in scorer.prompts if "Domain:" in p]
    assert len(domain_prompts) == 4 and all("general, mathematics, programming, disciplinary" in p for p in domain_prompts)
    quality_prompts = [p for p in scorer.prompts if "quality" in p]
    assert "mathematics domain" in quality_prompts[0] and texts[0][0] in quality_prompts[0]
    assert "programming domain" in quality_prompts[1]
    assert sum("repeat itself" in p for p in scorer.prompts) == 5

    flag = load_settings(overrides={"scorer": {"unparsable": "flag"}})
    scorer = Injected(flag.scorer, {"domain": ["general"], "quality": ["no idea"], "repetition": ["5"]})
    (r,) = scorer.score([("Some text.", False)])
    assert r.findings == [{"rule": "scorer.unparsable", "stage": "quality", "output": "no idea"}]


def test_sample_text_for_the_prompt():
    raw = json.dumps({"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}).encode()
    assert sample_text(read_view(raw, "chat"), 100) == "User: Q?\nAssistant: A."
    pair = json.dumps({"question": "Q?", "chosen": "good", "rejected": "bad"}).encode()
    assert sample_text(read_view(pair, "chat"), 100) == "User: Q?\nAssistant: good"
    assert sample_text(read_view(json.dumps({"text": "x" * 50}).encode(), "text"), 10) == "x" * 10 + " [...]"


def test_tiny_model_batched_generation_and_chat_template(tiny_model):
    plain, chat = tiny_model
    s = load_settings(overrides={"scorer": {"batch_size": 3, "max_new_tokens": 5}})
    scorer = load_scorer(plain, s.scorer)
    prompts = ["Score: the dog", "Hello world! How are you today? I am fine", "numbers 0 1 2", "fox"]
    batched = scorer.generate(prompts)
    # left padding with an attention mask: every answer is what the prompt alone gives
    alone = [scorer.generate([p])[0] for p in prompts]
    assert batched == alone and len(batched) == 4
    assert scorer.prompt("Rate this.") == "Rate this."
    templated = load_scorer(chat, s.scorer)
    assert templated.prompt("Rate this.") == "<|im_start|>user\nRate this.<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_scorer(plain + "-missing", s.scorer)


def test_pipeline_with_the_tiny_model(tiny_model, tmp_path):
    plain, _ = tiny_model
    data = tmp_path / "data"
    os.makedirs(data)
    texts = ["The quick brown fox jumps over the lazy dog.", "Grace Hopper was a computer scientist.",
             "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000", "She wrote one of the first compilers."]
    write_jsonl(str(data / "corpus.jsonl"), [{"text": t} for t in texts] + [{"text": "0" * 50}])
    write_jsonl(str(data / "chat.jsonl"), [
        {"conversations": [{"from": "human", "value": "Who was she?"}, {"from": "gpt", "value": texts[1]}]},
        {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                             {"from": "gpt", "value": texts[0]}]}])
    meta = str(data / "meta.json")
    json.dump({"corpus": {"annotation": "corpus.jsonl", "kind": "text"}, "chat": {"annotation": "chat.jsonl"}},
              open(meta, "w"))
    s = load_settings(overrides={"scorer": {"batch_size": 2, "max_new_tokens": 4, "unparsable": "flag"}})
    out = str(tmp_path / "out")
    report = run_filter(meta, out, s, scorer_dir=plain, log=lambda m: None)
    by = {d["dataset"]: d for d in report["datasets"]}
    c, ch = by["corpus"], by["chat"]
    # the zeros line is flagged by the rules and never reaches the scorer
    assert c["rules"]["char_run"]["flagged"] == 1
    assert c["rules"]["scorer.quality"]["seen"] == 4 and c["rules"]["scorer.repetition"]["seen"] == 4
    assert ch["rules"]["scorer.quality"]["seen"] == 1 and ch["rules"]["scorer.repetition"]["seen"] == 2
    # a random model's answers: each one either parsed or counted as unparsable, never a crash
    unparsable = c["scorer"]["unparsable"]
    flagged = list(read_flagged(os.path.join(out, "corpus", "flagged.jsonl")))
    unparsable_flags = [e for r in flagged for e in r["evidence"] if e["rule"] == "scorer.unparsable"]
    assert len(unparsable_flags) == unparsable.get("quality", 0) + unparsable.get("repetition", 0)
    assert all(isinstance(e["output"], str) for e in unparsable_flags)
    assert sum(c["scorer"]["domains"].values()) == 4
    assert c["seen"] == c["kept"] + c["flagged"]
