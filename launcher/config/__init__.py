"""Run configuration: the schema (schema.py) and the YAML/CLI loader (loader.py).

    from adadecode.launcher.config import load_config
    cfg = load_config(["--config", "configs/smollm2-135m.yaml", "--pipeline.stages=3"])
"""

from .loader import config_help, config_to_dict, dump_yaml, load_config, load_spec, sampling_params
from .schema import (
    ConfigError,
    DecodingConfig,
    LoggingConfig,
    ModelConfig,
    PipelineConfig,
    RunConfig,
    SamplingConfig,
    ServeConfig,
    TransportConfig,
    check_world_size,
    field_docs,
)

__all__ = [
    "ConfigError",
    "DecodingConfig",
    "LoggingConfig",
    "ModelConfig",
    "PipelineConfig",
    "RunConfig",
    "SamplingConfig",
    "ServeConfig",
    "TransportConfig",
    "check_world_size",
    "config_help",
    "config_to_dict",
    "dump_yaml",
    "field_docs",
    "load_config",
    "load_spec",
    "sampling_params",
]
