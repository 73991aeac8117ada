"""Build the tiny built-in dataset used by the quick start, the tiny recipes and the tests.

Real photos that ship inside installed packages (matplotlib's Grace Hopper portrait,
scikit-learn's China temple and flower), cropped and resized into varied aspect ratios, each with
a caption that names its source photo, plus multi-image and text-only conversations, a native
pre-training (interleaved) file, a plain text corpus and preference pairs for MPO (`meta_mpo.json`). A byte-level BPE tokenizer is trained on
the texts with the special tokens in a fixed order, so ``<IMG_CONTEXT>`` always has id 5.

    python examples/tiny/make_dataset.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
           "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>"]
IMG_CONTEXT_ID = 5
VOCAB_SIZE = 512

CAPTIONS = {
    "grace_hopper": "A portrait of Grace Hopper in her navy uniform.",
    "china": "A temple in China under a blue sky.",
    "flower": "A pink flower with green leaves.",
}
TEXT = [
    "Grace Hopper wrote one of the first compilers.",
    "The temple has a red roof and stands in a garden.",
    "Flowers open in the spring and close at night.",
    "A vision language model reads images and text together.",
    "Packing puts several short samples into one long sequence.",
    "The quick brown fox jumps over the lazy dog.",
]


def photo_paths() -> dict[str, str]:
    import matplotlib
    import sklearn

    mpl = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    skl = Path(sklearn.__file__).parent / "datasets" / "images"
    paths = {"grace_hopper": mpl, "china": skl / "china.jpg", "flower": skl / "flower.jpg"}
    for name, p in paths.items():
        if not p.is_file():
            raise FileNotFoundError(f"photo {name} not found at {p}: pip install matplotlib scikit-learn")
    return {k: str(v) for k, v in paths.items()}


def make_images(out: Path) -> list[tuple[str, str]]:
    """Crops and resizes of each photo: (relative path, source name)."""
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    made = []
    for name, path in photo_paths().items():
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            variants = {
                "full": im.resize((w // 4, h // 4)),
                "wide": im.crop((0, h // 4, w, 3 * h // 4)).resize((w // 4, h // 8)),
                "tall": im.crop((w // 4, 0, 3 * w // 4, h)).resize((w // 8, h // 4)),
                "small": im.resize((48, 40)),
            }
            for tag, img in variants.items():
                rel = f"images/{name}_{tag}.jpg"
                img.save(out / rel, quality=90)
                made.append((rel, name))
    return made


def train_tokenizer(out: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = list(CAPTIONS.values()) + TEXT + [
        "Describe the image.", "What is in the picture?", "Which photo comes first?",
        "system user assistant", "You are a helpful assistant.",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 64, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus * 10, trainer=trainer)
    if tok.token_to_id("<IMG_CONTEXT>") != IMG_CONTEXT_ID:
        raise RuntimeError("tokenizer special-token order changed")
    path = out / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build(out: str | os.PathLike) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = make_images(out)
    train_tokenizer(out)
    chat = []
    for rel, name in images:
        chat.append({"image": rel, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": CAPTIONS[name]}]})
    for (a, na), (b, nb) in zip(images[::2], images[1::2]):
        chat.append({"image": [a, b], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhich photo comes first?"},
            {"from": "gpt", "value": CAPTIONS[na]}]})
    for text in TEXT:
        chat.append({"conversations": [{"from": "human", "value": "Say something true."},
                                       {"from": "gpt", "value": text}]})
    write_jsonl(out / "chat.jsonl", chat)
    write_jsonl(out / "pretrain.jsonl", [
        {"image": rel, "text": f"<image>\n{CAPTIONS[name]}"} for rel, name in images])
    write_jsonl(out / "text.jsonl", [{"text": t} for t in TEXT])
    meta = {
        "tiny_chat": {"root": ".", "annotation": "chat.jsonl", "data_augment": True,
                      "max_dynamic_patch": 2, "repeat_time": 1, "length": len(chat)},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    native = {
        "tiny_pretrain": {"root": ".", "annotation": "pretrain.jsonl", "kind": "pretrain",
                          "max_dynamic_patch": 2, "repeat_time": 1},
        "tiny_text": {"annotation": "text.jsonl", "kind": "text", "repeat_time": 1},
    }
    (out / "meta_native.json").write_text(json.dumps(native, indent=1))
    write_jsonl(out / "preference.jsonl", preference_pairs(images))
    mpo = {"tiny_preference": {"root": ".", "annotation": "preference.jsonl", "data_augment": False,
                               "max_dynamic_patch": 2, "repeat_time": 1}}
    (out / "meta_mpo.json").write_text(json.dumps(mpo, indent=1))
    return out


def preference_pairs(images: list[tuple[str, str]]) -> list[dict]:
    """MMPR-style pairs: each image's own caption is chosen, a garbled caption of another photo
    rejected; text-only pairs prefer a true sentence to a scrambled one; one pair has an earlier
    turn. No rejected response is ever a chosen one."""
    def scrambled(text: str) -> str:
        return " ".join(reversed(text.rstrip(".").split())) + "."

    names = list(CAPTIONS)
    pairs = []
    for rel, name in images:
        wrong = names[(names.index(name) + 1) % len(names)]
        pairs.append({"image": rel, "question": "<image>\nDescribe the image.",
                      "chosen": CAPTIONS[name], "rejected": scrambled(CAPTIONS[wrong])})
    for text in TEXT[:4]:
        pairs.append({"question": "Say something true.", "chosen": text, "rejected": scrambled(text)})
    rel, name = images[0]
    pairs.append({"image": rel, "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"},
        {"from": "gpt", "value": CAPTIONS[name]}],
        "question": "Describe the image.", "chosen": CAPTIONS[name], "rejected": TEXT[5]})
    return pairs


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "runs/tiny/data"
    print(f"tiny dataset written to {build(target)}")
