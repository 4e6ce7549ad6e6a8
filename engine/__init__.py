"""The physical side: model code, paged KV, attention backends, runner, step loop, offline API."""

from engine.config import CacheConfig, EngineConfig, ModelArchConfig
from engine.llm import LLM, GenerationResult
from engine.llm_engine import LLMEngine
from engine.output_processor import RequestOutput
from scheduler import (
                       CapacityExceeded,
                       DSparkError,
                       EngineDead,
                       InvalidRequest,
                       ModelLoadError,
                       SamplingParams,
                       SchedulerConfig,
                       StructuredOutput,
)

__all__ = [
    "LLM", "CacheConfig", "CapacityExceeded", "DSparkError", "EngineConfig", "EngineDead",
    "GenerationResult", "InvalidRequest", "LLMEngine", "ModelArchConfig", "ModelLoadError",
    "RequestOutput", "SamplingParams", "SchedulerConfig", "StructuredOutput",
]
