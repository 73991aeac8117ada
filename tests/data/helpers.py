"""Shared fixtures for the data tests: tiny tokenizers, a fake media decoder, toy datasets."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Describe the image in detail.",
    "What is in the picture? A woman in a uniform.",
    "user assistant system image picture photo answer question",
    "Grace Hopper was a computer scientist and a naval officer.",
    "She wrote one of the first compilers, and she liked clear language.",
    "Frame video the dog runs across the field, then the fox follows.",
    "Hello world! How are you today? I am fine, thank you.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
] * 20


def train_bpe(path: str, vocab_size: int = 400) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tok.save(path)
    return path


def train_sentencepiece(prefix: str, vocab_size: int = 320) -> str:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"], hard_vocab_limit=False,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, character_coverage=1.0,
    )
    return prefix + ".model"


class FakeMedia:
    """Stands in for the image/video decoders: tiles from the image width, values from the rng.

    Images are small PNGs: an image W px wide gives min(max_tiles, max(min_tiles, W // 16))
    tiles (plus nothing else); files that PIL cannot read raise like the real decoder.
    Videos are text files "FRAMES n"; anything else raises VideoDecodeError.
    """

    def __init__(self, image_size: int):
        self.image_size = image_size

    def image_tiles(self, path, *, max_tiles, min_tiles, augment, rng):
        from PIL import Image

        with Image.open(path) as im:
            im.load()
            w, h = im.size
            base = float(np.asarray(im.convert("L")).mean()) / 255.0
        n = min(max_tiles, max(min_tiles, w // 16))
        S = self.image_size
        vals = torch.tensor(rng.random(n) if augment else np.full(n, base), dtype=torch.float32)
        return vals.view(n, 1, 1, 1).expand(n, 3, S, S).contiguous()

    def video_frames(self, path, *, rng):
        with open(path) as f:
            text = f.read()
        if not text.startswith("FRAMES "):
            from megatron_internvl.data.video import VideoDecodeError

            raise VideoDecodeError(path, "not a video")
        n = int(text.split()[1])
        S = self.image_size
        vals = torch.tensor(rng.random(n), dtype=torch.float32)
        return vals.view(n, 1, 1, 1).expand(n, 3, S, S).contiguous()


def write_image(path: str, w: int, h: int, value: int = 128) -> str:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (w, h), (value, value // 2, 255 - value)).save(path)
    return path


def write_jsonl(path: str, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return path


def conv(q: str, a: str, *more) -> list:
    turns = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    for k, v in enumerate(more):
        turns.append({"from": "human" if k % 2 == 0 else "gpt", "value": v})
    return turns


def make_toy_data(root: str, n_single: int = 40, n_multi: int = 12, n_text: int = 20, n_video: int = 8,
                  n_pretrain: int = 10, n_corpus: int = 20, seed: int = 0, real_videos: bool = False) -> str:
    """A meta.json over five datasets of every kind; returns the meta path."""
    rng = np.random.default_rng(seed)
    img_dir = os.path.join(root, "images")
    for k in range(8):
        write_image(os.path.join(img_dir, f"img{k}.png"), 16 * (k + 1), 24, value=30 * k)
    words = "the quick brown fox jumps over lazy dog image picture answer question".split()

    def sentence(n):
        return " ".join(rng.choice(words, size=n))

    single = [{"image": f"img{rng.integers(8)}.png",
               "conversations": conv("<image>\n" + sentence(int(rng.integers(2, 12))), sentence(int(rng.integers(2, 30))))}
              for _ in range(n_single)]
    multi = []
    for _ in range(n_multi):
        k = int(rng.integers(2, 4))
        q = "".join(f"Image-{i + 1}: <image>\n" for i in range(k)) + sentence(5)
        multi.append({"image": [f"img{rng.integers(8)}.png" for _ in range(k)], "conversations": conv(q, sentence(10))})
    text = [{"conversations": conv(sentence(int(rng.integers(3, 20))), sentence(int(rng.integers(3, 60))), sentence(4), sentence(9))}
            for _ in range(n_text)]
    vid_dir = os.path.join(root, "videos")
    os.makedirs(vid_dir, exist_ok=True)
    for k in range(3):
        if real_videos:
            write_video(os.path.join(vid_dir, f"v{k}.mp4"), frames=k + 2)
            continue
        with open(os.path.join(vid_dir, f"v{k}.mp4"), "w") as f:
            f.write(f"FRAMES {k + 2}")
    video = [{"video": f"v{rng.integers(3)}.mp4", "conversations": conv("<video>\n" + sentence(4), sentence(8))}
             for _ in range(n_video)]
    pretrain = [{"image": ["img1.png", "img2.png"], "text": sentence(30) + " <image> " + sentence(80) + " <image> " + sentence(20)}
                for _ in range(n_pretrain)]
    corpus = [{"text": sentence(int(rng.integers(10, 200)))} for _ in range(n_corpus)]
    ann = os.path.join(root, "ann")
    os.makedirs(ann, exist_ok=True)
    meta = {
        "single": {"root": "images", "annotation": "ann/single.jsonl", "data_augment": True, "max_dynamic_patch": 6,
                   "repeat_time": 1, "length": n_single},
        "multi": {"root": "images", "annotation": "ann/multi.jsonl", "data_augment": False, "max_dynamic_patch": 8,
                  "repeat_time": 2, "length": n_multi},
        "text": {"root": "", "annotation": "ann/text.jsonl", "repeat_time": 0.5, "length": n_text},
        "video": {"root": "videos", "annotation": "ann/video.jsonl", "max_dynamic_patch": 1, "repeat_time": 1,
                  "length": n_video},
        "pretrain": {"root": "images", "annotation": "ann/pretrain.jsonl", "kind": "pretrain", "max_dynamic_patch": 4,
                     "repeat_time": 1},
        "corpus": {"annotation": "ann/corpus.jsonl", "kind": "text", "repeat_time": 1},
    }
    for name, recs in (("single", single), ("multi", multi), ("text", text), ("video", video),
                       ("pretrain", pretrain), ("corpus", corpus)):
        write_jsonl(os.path.join(ann, f"{name}.jsonl"), recs)
    path = os.path.join(root, "meta.json")
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
    return path


def toy_config(meta: str, tokenizer: str, **kw):
    from megatron_internvl.config.data import DataConfig

    base = dict(meta_path=meta, tokenizer_path=tokenizer, image_size=8, num_image_token=4, max_tokens=512,
                system_message="You are a helpful assistant.",
                max_tiles=12, pack_buffer_size=8, pad_to_multiple=8, num_workers=0, seed=7,
                skip_ratio_warmup=10_000,
                # the per-rank loader these tests were written for; tests/data/test_balance.py
                # covers the planned one (shard_by=global, the default)
                shard_by="sample")
    base.update(kw)
    return DataConfig(**base)


def batch_digest(batch) -> list:
    """Everything in a micro-batch, as plain lists, for exact comparisons across processes."""
    out = []
    for k in sorted(batch):
        v = batch[k]
        if isinstance(v, torch.Tensor):
            out.append((k, str(v.dtype), list(v.shape), v.flatten().tolist()))
        else:
            out.append((k, v if not isinstance(v, list) else [list(x) if isinstance(x, tuple) else x for x in v]))
    return out


def write_video(path: str, frames: int, size: int = 32) -> str:
    """A real (mpeg4) video whose frame k is a flat grey of value 40 * k."""
    import av

    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for k in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((size, size, 3), 40 * k, np.uint8), format="rgb24")
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
