"""The LLM side of InternVL (Qwen2/2.5, InternLM2/2.5, Llama-3 style) from megatron-core pieces.

A plain module: vocab-parallel embedding, a megatron ``TransformerBlock`` (the pipeline stage's
share of layers, final norm on the last stage), and an untied column-parallel output layer.
Rotary angles come from per-token float positions (:mod:`.rotary`), so packed sequences and V2PE
need nothing special. ``embed`` is separate from ``forward`` so the VLM can overwrite the
``<IMG_CONTEXT>`` embeddings before the decoder runs.

The vocabulary may be padded (``padded_vocab_size``, see :mod:`.padding`) so it splits evenly over
TP ranks: padded logits are -inf, so softmax, cross-entropy and argmax equal the unpadded model;
checkpoints hold only the real rows.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from .padding import trim_entries
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
        padded_vocab_size: int | None = None,
    ):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False  # InternVL's LLMs have an untied lm_head
        self.pre_process = pre_process
        self.post_process = post_process
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size or vocab_size
        if self.padded_vocab_size < vocab_size or self.padded_vocab_size % config.tensor_model_parallel_size:
            raise ValueError(
                f"padded vocab size {self.padded_vocab_size} must be >= vocab size {vocab_size} and "
                f"divisible by tensor parallel size {config.tensor_model_parallel_size}"
            )
        if pre_process:
            # Not scattered here: image features are spliced in first, then scattered.
            self.embedding = LanguageModelEmbedding(
                config,
                vocab_size=self.padded_vocab_size,
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
                self.padded_vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                gather_output=False,
                skip_bias_add=False,
            )

        if self.padded_vocab_size > vocab_size:
            self._zero_padded_rows()

    def _padding_start(self) -> int:
        """Index (within this TP rank's vocab slice) where padding starts; slice size if none."""
        from megatron.core import parallel_state

        per_rank = self.padded_vocab_size // self.config.tensor_model_parallel_size
        start = parallel_state.get_tensor_model_parallel_rank() * per_rank
        return max(0, min(per_rank, self.vocab_size - start))

    @torch.no_grad()
    def _zero_padded_rows(self) -> None:
        real = self._padding_start()
        if self.pre_process:
            self.embedding.word_embeddings.weight[real:].zero_()
        if self.post_process:
            self.output_layer.weight[real:].zero_()

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        # Trimmed whether or not this TP size pads: the same checkpoint layout for every TP.
        trim_entries(sd, {"embedding.word_embeddings.weight": 0, "output_layer.weight": 0},
                     self.vocab_size)
        return sd

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
        output_hidden: bool = False,
    ) -> torch.Tensor:
        """Returns vocab-parallel logits [S, B, V/TP] on the last stage, hidden states elsewhere.

        ``output_hidden=True``: the last stage returns the final-norm hidden states [S(/TP), B, H]
        instead, for a loss that applies ``output_layer.weight`` itself without holding the
        logits (``training.loss.fused_weighted_token_loss``)."""
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
        if not self.post_process or output_hidden:
            return hidden
        logits, _ = self.output_layer(hidden)
        real = self._padding_start() if self.padded_vocab_size > self.vocab_size else None
        if real is not None and real < logits.shape[-1]:
            pad = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            pad[real:] = True
            logits = logits.masked_fill(pad, float("-inf"))
        return logits
