"""InternVL: InternViT -> drop class token -> pixel unshuffle -> MLP projector -> LLM.

The vision tower and projector live on the first pipeline stage only (``pre_process``), next to
the LLM's embedding. Image features overwrite the embeddings of the ``<IMG_CONTEXT>`` tokens in
order (sample-major, then token order), then the LLM runs (scattering the spliced embeddings for
sequence parallelism). Later stages hold only their LLM layers.

Text-only micro-batches (no tiles) on a stage with a trainable vision tower or projector still
run one blank tile through them and splice zero of its features: every trainable parameter then
gets a (zero) gradient in the same autograd order as an image micro-batch, so megatron DDP's
bucketed, overlapped gradient reduction fires the same collectives on every data-parallel rank
and never waits for parameters that one rank did not use.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from .language import LanguageModel
from .projector import Projector
from .vision import InternViT, pixel_unshuffle


class InternVLModel(MegatronModule):
    def __init__(
        self,
        language_model: LanguageModel,
        vision_model: InternViT | None,
        projector: Projector | None,
        image_token_id: int,
        num_image_token: int,
        downsample_ratio: float = 0.5,
    ):
        super().__init__(config=language_model.config)
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        if self.pre_process != (vision_model is not None) or (vision_model is None) != (projector is None):
            raise ValueError("the vision tower and projector belong to the first pipeline stage only")
        self.vision_model = vision_model
        self.projector = projector
        self.language_model = language_model
        self.image_token_id = image_token_id
        self.scale = round(1 / downsample_ratio)
        self.share_embeddings_and_output_weights = False
        self._num_image_token = num_image_token
        self.image_size = None
        if vision_model is not None:
            emb = vision_model.embeddings
            self.image_size = emb.grid * emb.patch_size
            if (emb.grid // self.scale) ** 2 != num_image_token:
                raise ValueError(
                    f"num_image_token={num_image_token} does not match the vision tower: "
                    f"({emb.grid} patches per side / {self.scale})^2 = {(emb.grid // self.scale) ** 2}"
                )

    # ---- properties -------------------------------------------------------------------------

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: (image_size / patch_size * downsample_ratio)^2, 256 for 448
        tiles; equals ModelConfig.num_image_token (on every pipeline stage)."""
        return self._num_image_token

    @property
    def vocab_size(self) -> int:
        return self.language_model.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.language_model.padded_vocab_size

    # ---- pipeline ---------------------------------------------------------------------------

    def set_input_tensor(self, input_tensor):
        self.language_model.set_input_tensor(input_tensor)

    # ---- freezing ---------------------------------------------------------------------------

    def freeze(self, vision: bool = False, projector: bool = False, language: bool = False,
               vit_trainable_last_layers: int | None = None) -> None:
        """Set ``requires_grad`` per component (True = frozen). Call before wrapping in DDP: frozen
        parameters then get no gradient buffer and no optimizer state.

        ``vit_trainable_last_layers=k`` (with ``vision=False``) trains only the ViT's last k
        layers; its embeddings and earlier layers are frozen.
        """
        if vit_trainable_last_layers is not None:
            if vision:
                raise ValueError("vit_trainable_last_layers needs vision=False (a trainable ViT)")
            if vit_trainable_last_layers < 0:
                raise ValueError(f"vit_trainable_last_layers={vit_trainable_last_layers} must be >= 0")
        for p in self.language_model.parameters():
            p.requires_grad_(not language)
        if self.projector is not None:
            for p in self.projector.parameters():
                p.requires_grad_(not projector)
        if self.vision_model is not None:
            for p in self.vision_model.parameters():
                p.requires_grad_(not vision)
            if vit_trainable_last_layers is not None:
                layers = self.vision_model.decoder.layers
                first_trainable = max(0, len(layers) - vit_trainable_last_layers)
                for p in self.vision_model.embeddings.parameters():
                    p.requires_grad_(False)
                for i, layer in enumerate(layers):
                    for p in layer.parameters():
                        p.requires_grad_(i >= first_trainable)

    # ---- forward ----------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] -> [tiles * num_image_token, llm_hidden], tile-major."""
        hidden = self.vision_model(pixel_values)  # [1 + grid^2, T, C]
        patches = hidden[1:].transpose(0, 1)  # drop the class token -> [T, grid^2, C]
        tokens = pixel_unshuffle(patches, self.scale)  # [T, grid^2 / s^2, s^2 * C]
        return self.projector(tokens.reshape(-1, tokens.shape[-1]))

    def _vision_trainable(self) -> bool:
        return any(p.requires_grad for p in self.vision_model.parameters()) or any(
            p.requires_grad for p in self.projector.parameters()
        )

    def _spliced_embeddings(self, input_ids, pixel_values, image_slots=None):
        embeddings = self.language_model.embed(input_ids)  # [S, B, H], complete on every rank
        is_image = input_ids == self.image_token_id  # [B, S]
        tiles = 0 if pixel_values is None else int(pixel_values.shape[0])
        expected = tiles * self._num_image_token if image_slots is None else int(image_slots.numel())
        self._check_image_tokens(is_image, tiles, expected)
        if tiles:
            features = self.image_features(pixel_values)
            if image_slots is not None:  # several token runs read the same tiles (preference pairs)
                features = features[image_slots]
        elif self.training and torch.is_grad_enabled() and self._vision_trainable():
            blank = torch.zeros(1, 3, self.image_size, self.image_size,
                                dtype=self.vision_model.embeddings.patch_embedding.weight.dtype,
                                device=embeddings.device)
            features = self.image_features(blank)  # spliced nowhere: a zero gradient
        else:
            return embeddings
        # The k-th <IMG_CONTEXT> token (sample-major, then token order) takes feature row k. The
        # rows come from a running count instead of nonzero(): no read-back of the token count,
        # forward or backward (index_select's gradient is an index_add).
        flat = is_image.reshape(-1)
        row = (torch.cumsum(flat, 0) - 1).clamp_(min=0)
        picked = features.to(embeddings.dtype).index_select(0, row)  # [B * S, H]
        out = torch.where(flat[:, None], picked, embeddings.transpose(0, 1).reshape(-1, embeddings.shape[-1]))
        return out.view(is_image.shape[0], is_image.shape[1], -1).transpose(0, 1).contiguous()

    def _check_image_tokens(self, is_image, tiles: int, expected: int) -> None:
        """The micro-batch holds one <IMG_CONTEXT> token per image feature. Checked on the device
        without a host read: a CPU tensor fails here with the counts named; on a GPU a mismatch
        is a device-side assertion (the data pipeline emits num_image_token tokens per tile)."""
        try:
            torch._assert_async(is_image.sum() == expected,
                                f"<IMG_CONTEXT> tokens != {expected} image features")
        except RuntimeError:
            raise ValueError(
                f"the micro-batch has {int(is_image.sum())} <IMG_CONTEXT> tokens (id "
                f"{self.image_token_id}) but {tiles} tiles x {self._num_image_token} tokens per "
                f"tile = {expected} image features: the data pipeline must emit num_image_token "
                "tokens per tile") from None

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        packed_seq_params=None,
        attention_mask=None,
        output_hidden: bool = False,
        image_slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Vocab-parallel logits [S, B, padded_vocab/TP] on the last stage (padding at -inf),
        hidden states [S(/TP with SP), B, H] elsewhere.

        input_ids [B, S]; position_ids [B, S] float (V2PE allowed); pixel_values [tiles, 3, H, W]
        (first stage only; None or 0 tiles for text); packed_seq_params: THD with cu_seqlens.
        ``output_hidden``: the last stage returns final-norm hidden states, not logits.
        ``image_slots`` [image tokens]: the feature row each ``<IMG_CONTEXT>`` token takes, in
        token order (default: one row per token, tile-major).
        """
        decoder_input = None
        if self.pre_process:
            decoder_input = self._spliced_embeddings(input_ids, pixel_values, image_slots)
        return self.language_model(
            input_ids, position_ids, decoder_input=decoder_input,
            packed_seq_params=packed_seq_params, attention_mask=attention_mask,
            output_hidden=output_hidden,
        )


def gather_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel logits [S, B, V/TP] -> full [S, B, vocab_size] on every TP rank (for tools
    and tests; training uses the vocab-parallel cross-entropy instead)."""
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return full[..., :vocab_size]
