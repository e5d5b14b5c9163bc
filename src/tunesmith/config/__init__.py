"""Typed project config (project.yaml), validated once; errors name the file, line and key.

`schema` holds the section models (`stages` those of the stages after training, `settings` the
self-contained groups nested in them), `load` reads, derives and writes configs; everything public is
importable from `tunesmith.config`.
"""

from __future__ import annotations

from tunesmith.config.load import derive, dump_config, load_config
from tunesmith.config.schema import (
    AugmentConfig,
    Bound,
    CleanConfig,
    DataConfig,
    ObjectiveConfig,
    Project,
    SuiteConfig,
    TaskConfig,
    TrainConfig,
)
from tunesmith.config.settings import (
    DecontaminateSettings,
    DistillSettings,
    DriftSettings,
    GenerationSettings,
    Int4Settings,
    Int8Settings,
    LabelNoiseSettings,
    LoraConfig,
    MonitorSettings,
    NearDedupSettings,
    NormalizeSettings,
    OverfitSettings,
    ParitySettings,
    PiiSettings,
    PrefixTuningSettings,
    PromptSearchSettings,
    PromptTuningSettings,
    PruneSettings,
    RequestLogSettings,
    RetrainSettings,
    SemanticDedupSettings,
)
from tunesmith.config.sources import DataSource
from tunesmith.config.stages import (
    EvalConfig,
    ExportConfig,
    FairnessConfig,
    HarnessConfig,
    JudgeConfig,
    OptimizeConfig,
    ServeConfig,
)

__all__ = [
    "AugmentConfig",
    "Bound",
    "CleanConfig",
    "DataConfig",
    "DataSource",
    "DecontaminateSettings",
    "DistillSettings",
    "DriftSettings",
    "EvalConfig",
    "ExportConfig",
    "FairnessConfig",
    "GenerationSettings",
    "HarnessConfig",
    "Int4Settings",
    "Int8Settings",
    "JudgeConfig",
    "LabelNoiseSettings",
    "LoraConfig",
    "MonitorSettings",
    "NearDedupSettings",
    "NormalizeSettings",
    "ObjectiveConfig",
    "OptimizeConfig",
    "OverfitSettings",
    "ParitySettings",
    "PiiSettings",
    "PrefixTuningSettings",
    "Project",
    "PromptSearchSettings",
    "PromptTuningSettings",
    "PruneSettings",
    "RequestLogSettings",
    "RetrainSettings",
    "SemanticDedupSettings",
    "ServeConfig",
    "SuiteConfig",
    "TaskConfig",
    "TrainConfig",
    "derive",
    "dump_config",
    "load_config",
]
