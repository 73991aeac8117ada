"""The LLM side of InternVL (Qwen2/2.5, InternLM2/2.5, Llama-3 style) from megatron-core pieces.

A plain module: vocab-parallel embedding, a megatron ``TransformerBlock`` (the pipeline stage's
share of layers, final norm on the last stage), and an untied column-parallel output layer.
Rotary angles come from per-token float positions (:mod:`.rotary`), so packed sequences and V2PE
need nothing special. ``embed`` is separate from ``forward`` so the VLM can overwrite the
``<IMG_CONTEXT>`` embeddings before the decoder runs.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from .rotary import FloatRotary
from .specs import block_spec


class LanguageModel(MegatronModule):
    def __init__(
        self,
        config,
        layer_spec,
        vocab_size: int,
        rope_theta: float,
        max_sequence_length: int,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False  # InternVL's LLMs have an untied lm_head
        self.pre_process = pre_process
        self.post_process = post_process
        self.vocab_size = vocab_size
        if pre_process:
            # Not scattered here: image features are spliced in first, then scattered.
            self.embedding = LanguageModelEmbedding(
                config,
                vocab_size=vocab_size,
                max_sequence_length=max_sequence_length,
                position_embedding_type="none",
                scatter_to_sequence_parallel=False,
            )
        self.rotary = FloatRotary(config.kv_channels, rope_theta)
        self.decoder = TransformerBlock(
            config,
            block_spec(config, layer_spec, vp_stage),
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
                skip_bias_add=False,
            )

    def set_input_tensor(self, input_tensor):
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] ids -> [S, B, H] embeddings, complete on every TP rank."""
        return self.embedding(input_ids=input_ids, position_ids=None)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor,
        decoder_input: torch.Tensor | None = None,
        packed_seq_params=None,
        attention_mask=None,
    ) -> torch.Tensor:
        """Returns vocab-parallel logits [S, B, V/TP] on the last stage, hidden states elsewhere."""
        if self.pre_process:
            if decoder_input is None:
                decoder_input = self.embed(input_ids)
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        else:
            decoder_input = None
        rotary = self.rotary(position_ids, packed=packed_seq_params is not None)
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            rotary_pos_emb=rotary,
            packed_seq_params=packed_seq_params,
        )
        if not self.post_process:
            return hidden
        logits, _ = self.output_layer(hidden)
        return logits
