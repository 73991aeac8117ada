"""Training stages as data: which components train (InternVL 2.5 / 3 recipes)."""

from __future__ import annotations

# True = frozen.
STAGE_FREEZE = {
    # InternVL3 native multimodal pre-training: everything trains on multimodal + text data.
    "native_pretrain": dict(vision=False, projector=False, language=False),
    # Stage 1: only the projector (MLP warm-up).
    "mlp_warmup": dict(vision=True, projector=False, language=True),
    # Stage 1.5: ViT incremental learning (ViT + projector).
    "vit_incremental": dict(vision=False, projector=False, language=True),
    # Stage 2: full instruction tuning.
    "full": dict(vision=False, projector=False, language=False),
    # Mixed Preference Optimization on preference pairs (training/mpo/objective.py): projector + LLM, the
    # ViT a fixed feature extractor as in InternVL's preference-stage scripts.
    "mpo": dict(vision=True, projector=False, language=False),
}


def stage_freeze_flags(training) -> dict:
    flags = dict(STAGE_FREEZE[training.stage])
    if training.vit_trainable_last_layers is not None:
        flags["vision"] = False
        flags["vit_trainable_last_layers"] = training.vit_trainable_last_layers
    return flags


def apply_stage(chunks, training) -> dict:
    """Freeze per the stage (call before wrapping in DDP). Returns the flags used."""
    flags = stage_freeze_flags(training)
    for chunk in chunks:
        chunk.freeze(**flags)
        # A frozen ViT is a fixed feature extractor: no drop-path (eval mode) while it is frozen.
        if flags.get("vision") and getattr(chunk, "vision_model", None) is not None:
            chunk.vision_model.eval()
    return flags


def trainable_components(flags: dict) -> dict:
    return {
        "vision": not flags.get("vision", False),
        "projector": not flags.get("projector", False),
        "language": not flags.get("language", False),
    }
