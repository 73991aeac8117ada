"""One small tokenizer interface over HF `tokenizers` (tokenizer.json) and sentencepiece (.model).

Special tokens are matched by this class, not by the backend: text is split on the special
token strings and only the pieces between them reach the backend. Both backends therefore
treat `<|im_start|>`, `<img>`, ... identically, whether or not the vocabulary had them.
Tokens the vocabulary lacks are appended after its last id.

``bos_token`` and ``add_bos_token`` come from the tokenizer_config.json beside the file, as
transformers reads them: ``add_bos_token`` is None when the config does not say, and the
template's default applies (see templates.wants_bos).
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Optional, Sequence

from megatron_internvl.config.errors import InternVLError

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
# InternVL's order (quad, ref, box), so a vocabulary extended here gets the ids InternVL's does.
GROUNDING_TOKENS = ("<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# Added when missing, in this order.
REQUIRED_SPECIAL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT) + GROUNDING_TOKENS + CHATML_TOKENS


class TokenizerError(InternVLError, ValueError):
    pass


class _HFBackend:
    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.tok = HFTokenizer.from_file(path)

    def size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def piece_to_id(self, piece: str) -> Optional[int]:
        return self.tok.token_to_id(piece)

    def add_special(self, piece: str) -> int:
        from tokenizers import AddedToken

        self.tok.add_special_tokens([AddedToken(piece, special=True, normalized=False)])
        return self.tok.token_to_id(piece)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


class _SPBackend:
    def __init__(self, path: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=path)
        self._n = self.sp.get_piece_size()

    def size(self) -> int:
        return self._n

    def piece_to_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            return None
        return i

    def add_special(self, piece: str) -> None:
        return None  # ids are assigned by Tokenizer after the sentencepiece vocabulary

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))


def _resolve(path: str) -> tuple[str, str]:
    if os.path.isdir(path):
        for name, kind in (("tokenizer.json", "hf"), ("tokenizer.model", "sp")):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                return p, kind
        raise TokenizerError(f"tokenizer folder {path!r} has neither tokenizer.json nor tokenizer.model.")
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer path {path!r} does not exist; set data.tokenizer_path.")
    if path.endswith(".json"):
        return path, "hf"
    if path.endswith(".model"):
        return path, "sp"
    raise TokenizerError(f"tokenizer path {path!r}: expected a tokenizer.json or a sentencepiece .model file.")


def _side_config(path: str) -> dict:
    cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    if os.path.isfile(cfg):
        try:
            with open(cfg, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}
    return {}


def _token_str(v) -> Optional[str]:
    if isinstance(v, dict):
        return v.get("content")
    return v


class Tokenizer:
    """encode/decode with special-token splitting; ids for the image and template tokens."""

    def __init__(self, path: str, *, extra_special_tokens: Iterable[str] = (),
                 bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                 pad_token: Optional[str] = None):
        file, kind = _resolve(path)
        self.path = file
        self.kind = kind
        self._b = _HFBackend(file) if kind == "hf" else _SPBackend(file)
        side = _side_config(file)

        self.special_to_id: dict[str, int] = {}
        wanted = list(REQUIRED_SPECIAL_TOKENS) + [t for t in extra_special_tokens]
        if kind == "hf":
            # Tokens the tokenizer file already declares as added/special are matched too.
            for t in json.load(open(file, encoding="utf-8")).get("added_tokens", []):
                if t.get("special"):
                    wanted.append(t["content"])
        next_id = self._b.size()
        for tok in dict.fromkeys(wanted):
            i = self._b.piece_to_id(tok)
            if i is None:
                i = self._b.add_special(tok)
                if i is None:
                    i = next_id
                next_id = max(next_id, i) + 1
            self.special_to_id[tok] = i
        self.id_to_special = {i: t for t, i in self.special_to_id.items()}
        self.vocab_size = max(self._b.size(), next_id, max(self.id_to_special) + 1)
        pattern = "|".join(re.escape(t) for t in sorted(self.special_to_id, key=len, reverse=True))
        self._split = re.compile(f"({pattern})")

        self.img_start_id = self.special_to_id[IMG_START]
        self.img_end_id = self.special_to_id[IMG_END]
        self.img_context_id = self.special_to_id[IMG_CONTEXT]

        add_bos = side.get("add_bos_token")
        self.add_bos_token: Optional[bool] = add_bos if isinstance(add_bos, bool) else None
        if kind == "sp":
            sp = self._b.sp
            self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
            named = self._lookup(_token_str(side.get("bos_token")))
            if named is not None:
                self.bos_id = named
            self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
            self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else None
        else:
            self.bos_id = self._lookup(bos_token or _token_str(side.get("bos_token")))
            self.eos_id = self._lookup(eos_token or _token_str(side.get("eos_token")))
            self.pad_id = self._lookup(pad_token or _token_str(side.get("pad_token")))
            if self.eos_id is None:
                for cand in ("<|endoftext|>", "</s>", "<|im_end|>"):
                    self.eos_id = self._lookup(cand)
                    if self.eos_id is not None:
                        break
        if bos_token and self.kind == "sp":
            self.bos_id = self._lookup(bos_token)
        if eos_token and self.kind == "sp":
            self.eos_id = self._lookup(eos_token)
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        if self.add_bos_token and self.bos_id is None:
            raise TokenizerError(
                f"the tokenizer_config.json beside {file} sets add_bos_token=true but names no bos_token "
                "found in the vocabulary; set bos_token there (e.g. \"<s>\") or add_bos_token=false."
            )

    def _lookup(self, tok: Optional[str]) -> Optional[int]:
        if tok is None:
            return None
        if tok in self.special_to_id:
            return self.special_to_id[tok]
        return self._b.piece_to_id(tok)

    def token_id(self, token: str) -> int:
        i = self._lookup(token)
        if i is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary of {self.path}.")
        return i

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special token strings map to their ids, no BOS/EOS added."""
        out: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            sid = self.special_to_id.get(piece)
            if sid is not None:
                out.append(sid)
            else:
                out.extend(self._b.encode(piece))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        parts, run = [], []
        for i in ids:
            i = int(i)
            if i in self.id_to_special:
                if run:
                    parts.append(self._b.decode(run))
                    run = []
                parts.append(self.id_to_special[i])
            else:
                run.append(i)
        if run:
            parts.append(self._b.decode(run))
        return "".join(parts)


def load_tokenizer(path: str, **kwargs) -> Tokenizer:
    return Tokenizer(path, **kwargs)
