import json
import sys

import pytest

from training.runner import ROOT, Trainer

sys.path.insert(0, str(ROOT / "examples" / "tiny"))


@pytest.fixture(scope="session")
def val_data(tmp_path_factory):
    """The tiny dataset plus `val_meta.json`: two validation datasets, the chat
    one with a sample whose image is missing."""
    from make_dataset import build

    data = build(tmp_path_factory.mktemp("tiny-data"))
    chat = (data / "chat.jsonl").read_text().splitlines()[:8]
    broken = json.dumps({"image": "images/missing.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "Nothing."}]})
    (data / "val_chat.jsonl").write_text("\n".join(chat[:3] + [broken] + chat[3:]) + "\n")
    more = (data / "chat.jsonl").read_text().splitlines()[12:18]
    (data / "val_more.jsonl").write_text("\n".join(more) + "\n")
    meta = {"val_chat": {"root": ".", "annotation": "val_chat.jsonl", "max_dynamic_patch": 2},
            "val_more": {"root": ".", "annotation": "val_more.jsonl", "max_dynamic_patch": 1}}
    (data / "val_meta.json").write_text(json.dumps(meta))
    samples = [{"image": "images/china_wide.jpg", "prompt": "Describe the image."},
               {"image": ["images/flower_tall.jpg", "images/china_small.jpg"], "prompt": "Compare them."}]
    (data / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return data


@pytest.fixture(scope="session")
def trainer(val_data):
    return Trainer(val_data)
