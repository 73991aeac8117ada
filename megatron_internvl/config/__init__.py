"""Configuration: dataclass schema, YAML recipes with inheritance, dotted overrides."""

from .loader import apply_overrides, build_dataclass, load_config, save_config
from .schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    LanguageConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
    VisionConfig,
)

__all__ = [
    "apply_overrides", "build_dataclass", "load_config", "save_config", "CheckpointConfig",
    "Config", "ConfigError", "LanguageConfig", "LoggingConfig", "ModelConfig", "OptimizerConfig",
    "ParallelConfig", "TrainingConfig", "VisionConfig",
]
