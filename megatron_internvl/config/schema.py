"""The configuration schema: one dataclass per section, the single source of truth.

Recipes (YAML) and command-line overrides are validated against these classes by
:mod:`megatron_internvl.config.loader`. Cross-field checks live in ``validate`` methods and raise
:class:`ConfigError` naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .data import DataConfig
from .errors import InternVLError


class ConfigError(InternVLError, ValueError):
    """A user-caused configuration problem; the message names the field and the fix."""


@dataclass
class VisionConfig:
    """InternViT. Defaults: InternViT-300M (V2.5)."""

    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    ffn_hidden_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    norm: str = "layernorm"  # "layernorm" (300M) or "rmsnorm" (6B)
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_norm: bool = False  # 6B: RMSNorm over the full hidden, before the head split
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.0


LANGUAGE_ARCHS = ("qwen2", "internlm2", "internlm3", "llama", "qwen3", "qwen3_moe")


@dataclass
class LanguageConfig:
    """The LLM. Defaults: Qwen2.5-0.5B (InternVL2.5/3-1B)."""

    arch: str = "qwen2"  # qwen2 | internlm2 | internlm3 | llama | qwen3 | qwen3_moe
    hidden_size: int = 896
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    ffn_hidden_size: int = 4864
    vocab_size: int = 151674
    rope_theta: float = 1_000_000.0
    # Dynamic NTK rope scaling factor of the HF config (InternLM3: 6.0); 0: none. It changes no
    # position below max_position_embeddings, which is all a packed sample uses here; it is kept
    # so that a conversion writes it back.
    rope_dynamic_factor: float = 0.0
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    # Width of one attention head; 0: hidden_size / num_heads. Qwen3: 128 at every size (the
    # 0.6B's 16 heads x 128 = 2048 query width over a 1024 hidden).
    head_dim: int = 0
    # Qwen3: one RMSNorm of size head_dim (shared by the heads) on q and on k, before RoPE.
    qk_norm: bool = False
    # Mixture of experts (qwen3_moe: every layer). 0 experts: dense MLPs.
    num_experts: int = 0
    moe_top_k: int = 8
    moe_ffn_hidden_size: int = 0  # one expert's FFN width (Qwen3-30B-A3B: 768)
    # Router: softmax over the experts, top-k, the k probabilities renormalised to sum 1 (HF
    # norm_topk_prob: true, what the Qwen3-MoE releases set); false: not renormalised.
    moe_norm_topk_prob: bool = True
    # Load-balancing (switch-style aux) loss and router z-loss coefficients; 0 turns one off.
    # Default 1e-3: HF Qwen3-MoE's router_aux_loss_coef (docs/config.md says why).
    moe_aux_loss_coeff: float = 1e-3
    moe_z_loss_coeff: float = 0.0
    max_position_embeddings: int = 32768
    # The model pads its vocabulary to a multiple of this x tensor_parallel (logits of the padding
    # are -inf; checkpoints keep the real rows only).
    make_vocab_size_divisible_by: int = 128

    @property
    def kv_channels(self) -> int:
        """The width of one attention head (``head_dim``, else hidden / heads)."""
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    downsample_ratio: float = 0.5
    projector_norm_eps: float = 1e-5
    image_token_id: int = 151667
    spec: str = "auto"  # auto | te | local: Transformer Engine modules or local megatron-core ones
    recompute: str = "none"  # none | full | selective (activation recomputation)
    # Output layer + cross-entropy chunk by chunk, never holding the [tokens, vocab/TP] logits
    # (megatron_internvl.kernels.fused_linear_ce); false: megatron's vocab-parallel CE on logits.
    fused_loss: bool = True
    # The local spec's flash kernels on CUDA (models/flash.py): auto = FlashAttention-3 where the
    # GPU is Hopper and FA3 is installed, else PyTorch's default (FA2); fa3 = required; default.
    flash_attention: str = "auto"

    def validate(self) -> None:
        if self.vision.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"model.vision.norm={self.vision.norm!r}: use 'layernorm' or 'rmsnorm'")
        if self.language.arch in ("gpt_oss", "gpt-oss"):
            raise ConfigError(
                "model.language.arch=gpt_oss (InternVL3.5-GPT-OSS) is not supported: it needs "
                "attention sinks, a 128-token sliding window on alternate layers, YaRN rope, "
                "clamped SwiGLU with biases, a biased router and the Harmony template"
            )
        if self.language.arch not in LANGUAGE_ARCHS:
            raise ConfigError(
                f"model.language.arch={self.language.arch!r}: use one of {', '.join(LANGUAGE_ARCHS)}"
            )
        if self.language.arch == "internlm3" and self.language.qkv_bias:
            raise ConfigError(
                "model.language.qkv_bias=true: InternLM3 has no attention biases; set it to false"
            )
        if self.language.rope_dynamic_factor and self.language.rope_dynamic_factor < 1.0:
            raise ConfigError(
                f"model.language.rope_dynamic_factor={self.language.rope_dynamic_factor}: use 0 "
                f"(no scaling) or a factor >= 1"
            )
        if self.spec not in ("auto", "te", "local"):
            raise ConfigError(f"model.spec={self.spec!r}: use 'auto', 'te' or 'local'")
        if self.flash_attention not in ("auto", "fa3", "default"):
            raise ConfigError(f"model.flash_attention={self.flash_attention!r}: use 'auto', 'fa3' or 'default'")
        if self.recompute not in ("none", "full", "selective"):
            raise ConfigError(f"model.recompute={self.recompute!r}: use 'none', 'full' or 'selective'")
        lang = self.language
        if lang.num_heads % lang.num_kv_heads:
            raise ConfigError(
                f"model.language.num_heads={lang.num_heads} is not a multiple of "
                f"model.language.num_kv_heads={lang.num_kv_heads}"
            )
        if lang.arch in ("qwen3", "qwen3_moe") and (lang.qkv_bias or not lang.qk_norm):
            raise ConfigError(
                f"model.language.arch={lang.arch} has q/k norms and no attention biases: set "
                f"model.language.qk_norm=true and model.language.qkv_bias=false"
            )
        if (lang.arch == "qwen3_moe") != (lang.num_experts > 0):
            raise ConfigError(
                f"model.language.num_experts={lang.num_experts} with arch={lang.arch}: experts are "
                f"for arch=qwen3_moe only, and qwen3_moe needs num_experts > 0"
            )
        if lang.num_experts and not (0 < lang.moe_top_k <= lang.num_experts and lang.moe_ffn_hidden_size > 0):
            raise ConfigError(
                f"model.language.moe_top_k={lang.moe_top_k} must be in [1, num_experts="
                f"{lang.num_experts}] and moe_ffn_hidden_size={lang.moe_ffn_hidden_size} > 0"
            )
        if lang.moe_aux_loss_coeff < 0 or lang.moe_z_loss_coeff < 0:
            raise ConfigError("model.language.moe_aux_loss_coeff and moe_z_loss_coeff must be >= 0")
        if lang.head_dim < 0:
            raise ConfigError(f"model.language.head_dim={lang.head_dim}: use 0 (hidden / heads) or a width")
        if not lang.head_dim and lang.hidden_size % lang.num_heads:
            raise ConfigError(
                f"model.language.hidden_size={lang.hidden_size} is not divisible by "
                f"model.language.num_heads={lang.num_heads}"
            )
        vis = self.vision
        if vis.image_size % vis.patch_size:
            raise ConfigError(
                f"model.vision.image_size={vis.image_size} is not a multiple of "
                f"model.vision.patch_size={vis.patch_size}"
            )
        grid = vis.image_size // vis.patch_size
        scale = round(1 / self.downsample_ratio)
        if abs(1 / scale - self.downsample_ratio) > 1e-9 or grid % scale:
            raise ConfigError(
                f"model.downsample_ratio={self.downsample_ratio} must be 1/k with k dividing the "
                f"patch grid {grid} (image_size / patch_size)"
            )

    @property
    def num_image_token(self) -> int:
        """LLM tokens per 448 tile: (image_size / patch_size * downsample_ratio) ** 2."""
        grid = self.vision.image_size // self.vision.patch_size
        return int(grid * self.downsample_ratio) ** 2


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    context_parallel: int = 1
    sequence_parallel: bool = False
    # LLM layers on the first pipeline stage (which also holds the ViT and projector).
    first_stage_llm_layers: Optional[int] = None
    # Experts of an MoE LLM split over this many ranks (all-to-all token dispatch); they come
    # out of the data-parallel ranks: it must divide tensor_parallel x data-parallel size.
    expert_parallel: int = 1
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # How long a collective waits for the slowest rank before the run fails (NCCL / gloo process
    # groups, megatron's groups too). Long enough for a first step's kernel compilation, a data
    # plan built on the reader ranks or a checkpoint save of a large model on a slow file system.
    timeout_minutes: float = 30.0

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        self.validate_world_size(world_size)
        return world_size // self.model_parallel_size

    def validate_world_size(self, world_size: int) -> None:
        if world_size % self.model_parallel_size:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor_parallel x "
                f"pipeline_parallel x context_parallel = {self.tensor_parallel} x "
                f"{self.pipeline_parallel} x {self.context_parallel}: change the layout or the "
                f"number of processes"
            )
        expert_ranks = self.expert_parallel * self.pipeline_parallel * self.context_parallel
        if world_size % expert_ranks:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.expert_parallel x "
                f"pipeline_parallel x context_parallel = {self.expert_parallel} x "
                f"{self.pipeline_parallel} x {self.context_parallel}: experts are split over ranks "
                f"of the tensor x data-parallel groups"
            )

    def validate(self, model: ModelConfig) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        if not self.timeout_minutes > 0:
            raise ConfigError(f"parallel.timeout_minutes={self.timeout_minutes} must be > 0 (minutes a "
                              f"collective waits for the slowest rank)")
        if self.context_parallel > 1:
            # Refused rather than run wrong: nothing splits a pack over the CP ranks yet, so each
            # would run the whole pack as if it were its chunk (and the local attention has no CP).
            raise ConfigError(
                f"parallel.context_parallel={self.context_parallel} is not supported yet (the "
                f"training step does not split packs over context-parallel ranks): set it to 1 and "
                f"use tensor_parallel with sequence_parallel, or pipeline_parallel, for long packs"
            )
        tp, lang = self.tensor_parallel, model.language
        for what, value in (
            ("model.language.num_heads", lang.num_heads),
            ("model.language.num_kv_heads", lang.num_kv_heads),
            ("model.language.ffn_hidden_size", lang.ffn_hidden_size),
            ("model.vision.ffn_hidden_size", model.vision.ffn_hidden_size),
        ):
            if value % tp:
                raise ConfigError(
                    f"parallel.tensor_parallel={tp} does not divide {what}={value}: "
                    f"choose a tensor_parallel size that divides it"
                )
        ep = self.expert_parallel
        if ep < 1 or (ep > 1 and not lang.num_experts) or (lang.num_experts and lang.num_experts % ep):
            raise ConfigError(
                f"parallel.expert_parallel={ep} must be >= 1 and divide model.language.num_experts="
                f"{lang.num_experts} (expert parallelism needs an MoE language model)"
            )
        if self.sequence_parallel and tp == 1:
            raise ConfigError(
                "parallel.sequence_parallel=true needs parallel.tensor_parallel > 1: "
                "set sequence_parallel=false or raise tensor_parallel"
            )
        pp, layers = self.pipeline_parallel, lang.num_layers
        if pp == 1:
            if self.virtual_pipeline_parallel not in (None, 1):
                raise ConfigError(
                    "parallel.virtual_pipeline_parallel needs parallel.pipeline_parallel > 1"
                )
            if self.first_stage_llm_layers is not None:
                raise ConfigError(
                    "parallel.first_stage_llm_layers needs parallel.pipeline_parallel > 1"
                )
            return
        first = self.first_stage_llm_layers
        if first is not None:
            if not 0 <= first <= layers:
                raise ConfigError(
                    f"parallel.first_stage_llm_layers={first} is outside [0, {layers}] "
                    f"(model.language.num_layers)"
                )
            if (layers - first) % (pp - 1):
                raise ConfigError(
                    f"after parallel.first_stage_llm_layers={first}, the remaining {layers - first} "
                    f"LLM layers do not split evenly over the other {pp - 1} pipeline stages"
                )
        elif layers % pp:
            raise ConfigError(
                f"parallel.pipeline_parallel={pp} does not divide model.language.num_layers="
                f"{layers}: change pipeline_parallel or set parallel.first_stage_llm_layers"
            )
        vpp = self.virtual_pipeline_parallel
        if vpp not in (None, 1):
            if first is not None:
                raise ConfigError(
                    "parallel.first_stage_llm_layers cannot be combined with "
                    "virtual_pipeline_parallel: remove one of them"
                )
            if (layers // pp) % vpp:
                raise ConfigError(
                    f"parallel.virtual_pipeline_parallel={vpp} does not divide the "
                    f"{layers // pp} LLM layers per pipeline stage"
                )


STAGES = ("native_pretrain", "mlp_warmup", "vit_incremental", "full", "mpo")


@dataclass
class TrainingConfig:
    stage: str = "full"  # native_pretrain | mlp_warmup | vit_incremental | full | mpo
    vit_trainable_last_layers: Optional[int] = None  # train only the last k ViT layers
    train_steps: int = 100
    micro_batch_size: int = 1  # packed sequences per micro-batch
    global_batch_size: int = 1  # packed sequences per optimizer step, over all DP ranks
    seed: int = 1234
    precision: str = "bf16"  # bf16 | fp32 | fp8 (fp8 needs Transformer Engine on Hopper)
    clip_grad: float = 1.0
    log_interval: int = 1
    max_nonfinite_in_row: int = 3
    loss_spike_factor: float = 3.0
    time_limit_minutes: Optional[float] = None
    # Save and exit (code 42, "requeue me") every N steps: fixed-length jobs in a chain.
    exit_interval: Optional[int] = None
    # Device BF16 peak for MFU; None = detect (H100/H200/A100 ...), none on CPU.
    peak_tflops: Optional[float] = None
    # Fault injection for tests: multiply the loss by NaN at these (1-based) steps.
    inject_nan_steps: list[int] = field(default_factory=list)
    # Micro-batches whose tiles are copied to the device ahead of the one the pipeline schedule
    # computes (the step's tiles are not all staged on the device first; docs/training.md).
    micro_batch_prefetch: int = 1

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"training.stage={self.stage!r}: choose one of {', '.join(STAGES)}")
        if self.precision not in ("bf16", "fp32", "fp8"):
            raise ConfigError(f"training.precision={self.precision!r}: use bf16, fp32 or fp8")
        for name in ("train_steps", "micro_batch_size", "global_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name}={getattr(self, name)} must be >= 1")
        if not self.clip_grad >= 0:
            raise ConfigError(f"training.clip_grad={self.clip_grad} must be >= 0 (0: no clipping)")
        if self.micro_batch_prefetch < 0:
            raise ConfigError(f"training.micro_batch_prefetch={self.micro_batch_prefetch} must be >= 0 "
                              "(micro-batches on the device ahead of the one being computed)")
        if self.max_nonfinite_in_row < 1:
            raise ConfigError(f"training.max_nonfinite_in_row={self.max_nonfinite_in_row} must be >= 1")
        if not self.loss_spike_factor > 1:
            raise ConfigError(f"training.loss_spike_factor={self.loss_spike_factor} must be > 1")
        for name in ("exit_interval", "time_limit_minutes", "peak_tflops"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"training.{name}={value} must be > 0 (or unset)")
        if self.micro_batch_size != 1:
            raise ConfigError(
                f"training.micro_batch_size={self.micro_batch_size}: a micro-batch is one packed "
                f"sequence (THD); put more samples in it with data.max_tokens / data.max_tiles"
            )


@dataclass
class LRMultipliers:
    vision: float = 1.0
    projector: float = 1.0
    language: float = 1.0


@dataclass
class OptimizerConfig:
    lr: float = 4e-5
    min_lr: float = 0.0
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    decay_style: str = "cosine"  # cosine | linear | constant
    lr_mult: LRMultipliers = field(default_factory=LRMultipliers)

    def validate(self) -> None:
        if self.decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(
                f"optimizer.decay_style={self.decay_style!r}: use cosine, linear or constant"
            )
        if not self.lr >= 0 or not self.min_lr >= 0:
            raise ConfigError(f"optimizer.lr={self.lr}, optimizer.min_lr={self.min_lr}: learning rates must be >= 0")
        if self.min_lr > self.lr:
            raise ConfigError(f"optimizer.min_lr={self.min_lr} is above optimizer.lr={self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optimizer.{name}={getattr(self, name)} must be in [0, 1) (e.g. 0.9, 0.999)")
        if not self.adam_eps > 0:
            raise ConfigError(f"optimizer.adam_eps={self.adam_eps} must be > 0 (e.g. 1e-8)")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")
        for component in ("vision", "projector", "language"):
            if not getattr(self.lr_mult, component) >= 0:
                raise ConfigError(f"optimizer.lr_mult.{component}={getattr(self.lr_mult, component)} must be >= 0")


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # directory; None = <run_dir>/checkpoints
    save_interval: Optional[int] = None
    keep_last: int = 3
    load: Optional[str] = None  # resume from here (default: the save directory, if it has one)
    finetune: bool = False  # load weights only: no optimizer, scheduler, RNG or data state
    async_save: bool = False
    init_language: Optional[str] = None  # component-wise initialisation
    init_vision: Optional[str] = None  # ViT + projector

    def validate(self) -> None:
        if self.keep_last < 1:
            raise ConfigError(
                f"checkpoint.keep_last={self.keep_last} must be >= 1: the newest checkpoint is "
                f"always kept (it is what a restart resumes from)")
        if self.save_interval is not None and self.save_interval < 1:
            raise ConfigError(f"checkpoint.save_interval={self.save_interval} must be >= 1 (or unset: "
                              f"save at the end and on stops only)")


MPO_REFERENCES = ("model", "precomputed")


@dataclass
class MpoConfig:
    """The MPO preference stage (``training.stage: mpo``; docs/mpo.md). InternVL3's defaults;
    its learning rate is about 2e-7 to 1e-6 (set optimizer.lr)."""

    beta: float = 0.1
    weights: list[float] = field(default_factory=lambda: [0.8, 0.2, 1.0])  # DPO, BCO, SFT
    label_smoothing: float = 0.0  # conservative DPO
    # model: a frozen copy of the starting policy runs forward-only in each step;
    # precomputed: log-probs from `megatron-internvl mpo-reference` (no second model).
    reference: str = "model"
    # The starting policy the reference is; None = checkpoint.load.
    reference_checkpoint: Optional[str] = None
    reference_file: Optional[str] = None  # precomputed: the mpo-reference output
    sft_reduction: str = "token"  # token (official) | sample | square

    def validate(self, checkpoint: "CheckpointConfig", parallel: ParallelConfig, data) -> None:
        if not self.beta > 0:
            raise ConfigError(f"mpo.beta={self.beta} must be > 0")
        if len(self.weights) != 3 or any(w < 0 for w in self.weights):
            raise ConfigError(f"mpo.weights={self.weights}: give three non-negative weights [dpo, bco, sft]")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"mpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.sft_reduction not in ("token", "sample", "square"):
            raise ConfigError(f"mpo.sft_reduction={self.sft_reduction!r}: use token, sample or square")
        if self.reference not in MPO_REFERENCES:
            raise ConfigError(f"mpo.reference={self.reference!r}: use one of {', '.join(MPO_REFERENCES)}")
        if not (self.reference_checkpoint or checkpoint.load):
            raise ConfigError("training.stage=mpo starts from a trained policy: set checkpoint.load (or "
                              "mpo.reference_checkpoint) to the SFT checkpoint")
        if data.synthetic.enabled:
            raise ConfigError("training.stage=mpo trains on preference pairs: set data.synthetic.enabled=false")
        if parallel.context_parallel > 1:
            raise ConfigError("training.stage=mpo does not support parallel.context_parallel > 1 yet: set it to 1")
        if self.reference == "precomputed":
            if not self.reference_file:
                raise ConfigError("mpo.reference=precomputed needs mpo.reference_file (written by "
                                  "`megatron-internvl mpo-reference RECIPE.yaml`)")
            if data.v2pe == "random":
                raise ConfigError("mpo.reference=precomputed needs the same positions in every epoch: "
                                  "data.v2pe=random draws new ones; use data.v2pe=fixed or mpo.reference=model")


@dataclass
class EvaluationConfig:
    """Validation loss during training and `megatron-internvl evaluate` (docs/evaluation.md)."""

    # InternVL meta JSON of the validation datasets (packed and weighted like the training data).
    meta_path: Optional[str] = None
    interval: int = 0              # evaluate every N steps; 0: never during training
    iters: Optional[int] = None    # packs per evaluation; None: the whole set
    initial: bool = False          # also evaluate before the first step
    # jsonl of {"image": PATH or [PATHS], "prompt": TEXT}: greedy answers logged at each evaluation
    samples: Optional[str] = None
    max_new_tokens: int = 32

    def validate(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 0:
            raise ConfigError(f"evaluation.interval={self.interval!r} must be an integer >= 0 (0: never)")
        if self.iters is not None and (not isinstance(self.iters, int) or self.iters < 1):
            raise ConfigError(f"evaluation.iters={self.iters!r} must be a positive integer, or null "
                              "for the whole validation set")
        if (self.interval or self.initial) and not (self.meta_path or self.samples):
            raise ConfigError("evaluation.interval / evaluation.initial need evaluation.meta_path (the "
                              "validation meta JSON, InternVL format) and/or evaluation.samples")
        if self.samples and not (self.interval or self.initial):
            raise ConfigError("evaluation.samples is set but evaluation.interval=0: set the interval")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"evaluation.max_new_tokens={self.max_new_tokens!r} must be a positive integer")


@dataclass
class WandbConfig:
    """Weights & Biases beside TensorBoard (`pip install wandb`); off while `project` is unset."""

    project: Optional[str] = None
    name: Optional[str] = None      # default: the run directory's name
    entity: Optional[str] = None
    mode: str = "online"            # online / offline (no network; `wandb sync` later) / disabled


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    tensorboard: bool = True
    progress: bool = True
    # [first, last] step recorded by torch.profiler (a trace per rank in RUN_DIR/profile); [] off.
    profile_steps: list = field(default_factory=list)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        if self.wandb.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"logging.wandb.mode={self.wandb.mode!r} is not one of online, offline, disabled")
        p = self.profile_steps
        if p and not (len(p) == 2 and all(isinstance(x, int) for x in p) and 1 <= p[0] <= p[1]):
            raise ConfigError(f"logging.profile_steps={p!r} must be [first, last] steps with "
                              "1 <= first <= last, or [] for no trace")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    mpo: MpoConfig = field(default_factory=MpoConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def validate(self, world_size: Optional[int] = None, require_data: bool = True) -> None:
        self.model.validate()
        self.parallel.validate(self.model)
        self.training.validate()
        self.optimizer.validate()
        self.checkpoint.validate()
        self.evaluation.validate()
        self.logging.validate()
        if self.training.stage == "mpo":
            self.mpo.validate(self.checkpoint, self.parallel, self.data)
        if self.optimizer.warmup_steps and self.optimizer.warmup_steps >= self.training.train_steps:
            raise ConfigError(
                f"optimizer.warmup_steps={self.optimizer.warmup_steps} must be below "
                f"training.train_steps={self.training.train_steps}: shorten the warm-up"
            )
        if require_data:
            try:
                self.data.validate()
            except ConfigError:
                raise
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        if world_size is not None:
            dp = self.parallel.data_parallel(world_size)
            per_step = self.training.micro_batch_size * dp
            if self.training.global_batch_size % per_step:
                raise ConfigError(
                    f"training.global_batch_size={self.training.global_batch_size} is not "
                    f"divisible by training.micro_batch_size x data-parallel size = "
                    f"{self.training.micro_batch_size} x {dp}: make it a multiple of {per_step}"
                )
