"""A format's table expanded for one model: every HF tensor name <-> every megatron tensor name.

Importing asks, for each canonical megatron tensor a rank holds, for its full value
(:meth:`Mapping.to_megatron`); exporting turns each full megatron tensor back into its HF tensors
(:meth:`Mapping.to_hf`). Names and shapes are checked here, with messages that name the tensor.
"""

from __future__ import annotations

from . import ConversionError
from .tables import IGNORED_HF_SUFFIXES, Rule, output_tied_to, table
from .transforms import Dims, expected_hf_shapes


def features(model_cfg) -> set[str]:
    """The optional parts a model has (what the tables' ``when=`` refer to)."""
    vis, lang = model_cfg.vision, model_cfg.language
    out = set()
    if lang.qkv_bias:
        out.add("qkv_bias")
    if lang.qk_norm:
        out.add("qk_norm")
    if vis.qkv_bias:
        out.add("vit_qkv_bias")
    if vis.qk_norm:
        out.add("vit_qk_norm")
    if vis.norm == "layernorm":
        out.add("vit_norm_bias")
    return out


def dims_of(model_cfg) -> Dims:
    vis, lang = model_cfg.vision, model_cfg.language
    return Dims(
        lm_heads=lang.num_heads,
        lm_groups=lang.num_kv_heads,
        lm_head_dim=lang.kv_channels,
        vit_heads=vis.num_heads,
        vit_head_dim=vis.hidden_size // vis.num_heads,
    )


def _expand(rule: Rule, model_cfg) -> list[tuple[str, tuple[str, ...]]]:
    """A rule's (megatron name, HF names) pairs: ``{i}`` over the tower's layers, then ``{e}``
    over the LLM's experts (global expert index on both sides)."""
    if rule.layers is None:
        pairs = [(rule.megatron, rule.hf)]
    else:
        n = model_cfg.language.num_layers if rule.layers == "language" else model_cfg.vision.num_layers
        pairs = [
            (rule.megatron.format(i=i, e="{e}"), tuple(h.format(i=i, e="{e}") for h in rule.hf))
            for i in range(n)
        ]
    if "{e}" not in rule.megatron:
        return pairs
    return [
        (meg.format(e=e), tuple(h.format(e=e) for h in hf))
        for meg, hf in pairs for e in range(model_cfg.language.num_experts)
    ]


class Mapping:
    def __init__(self, fmt: str, model_cfg, tied: bool = False):
        self.fmt = fmt
        self.model_cfg = model_cfg
        self.dims = dims_of(model_cfg)
        self.tied = tied
        feats = features(model_cfg)
        self.entries: dict[str, tuple] = {}  # megatron name -> (kind, hf names)
        for rule in table(fmt, model_cfg.language.arch):
            if rule.when is not None and rule.when not in feats:
                continue
            for meg, hf in _expand(rule, model_cfg):
                self.entries[meg] = (rule.kind, hf)
        out_name, emb_name = output_tied_to()
        if tied:
            # The output layer reads the embedding's HF tensor; there is no lm_head to expect.
            self.entries[out_name] = (self.entries[out_name][0], self.entries[emb_name][1])

    # --- names ------------------------------------------------------------------------------------
    def hf_names(self) -> list[str]:
        seen, out = set(), []
        for _, hf in self.entries.values():
            for name in hf:
                if name not in seen:
                    seen.add(name)
                    out.append(name)
        return out

    def check_names(self, present) -> None:
        """Missing and unexpected HF tensors are errors that name them."""
        expected = set(self.hf_names())
        present = {n for n in present if not n.endswith(IGNORED_HF_SUFFIXES)}
        missing = [n for n in self.hf_names() if n not in present]
        extra = sorted(present - expected)
        problems = []
        if missing:
            problems.append(f"missing tensor(s): {_listing(missing)}")
        if extra:
            problems.append(f"unexpected tensor(s) the {self.fmt} format does not map: {_listing(extra)}")
        if problems:
            raise ConversionError(
                "the checkpoint does not match its config.json: " + "; ".join(problems)
                + " (a truncated download, a different model than config.json describes, or an "
                "unsupported variant)"
            )

    # --- values -----------------------------------------------------------------------------------
    def _entry(self, name):
        if name not in self.entries:
            raise ConversionError(
                f"megatron tensor {name} has no row in the {self.fmt} mapping table "
                f"(a model feature the converter does not know)"
            )
        return self.entries[name]

    def expected_hf_shapes(self, name: str, shape: tuple) -> dict[str, tuple]:
        kind, hf = self._entry(name)
        return dict(zip(hf, expected_hf_shapes(kind, tuple(shape), self.dims)))

    def to_megatron(self, name: str, shape: tuple, reader):
        """The full megatron tensor ``name`` of ``shape``, built from the HF tensors in ``reader``."""
        kind, hf = self._entry(name)
        expected = self.expected_hf_shapes(name, shape)
        for hf_name, want in expected.items():
            got = reader.shape(hf_name)
            if got != want:
                raise ConversionError(
                    f"tensor {hf_name} has shape {got}, expected {want} from config.json "
                    f"(megatron {name} {tuple(shape)}): the weights do not match the config"
                )
        return kind.to_megatron([reader.get(h) for h in hf], tuple(shape), self.dims)

    def to_hf(self, name: str, tensor) -> list[tuple[str, object]]:
        kind, hf = self._entry(name)
        return list(zip(hf, kind.to_hf(tensor, self.dims)))


def _listing(names, limit=8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
