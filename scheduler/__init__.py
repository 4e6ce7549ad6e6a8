"""The logical side: requests, KV block accounting, continuous-batching scheduling. No torch."""

from scheduler.block_manager import BlockManager
from scheduler.errors import (
    CapacityExceeded,
    DeadlineExceeded,
    DSparkError,
    EngineDead,
    InvalidRequest,
    ModelLoadError,
    RequestFailed,
)
from scheduler.outputs import (
    ModelRunnerOutput,
    RequestUpdate,
    ScheduledRequest,
    SchedulerOutput,
    TokenLogprob,
)
from scheduler.request import Request, RequestStatus
from scheduler.sampling_params import SamplingParams, StructuredOutput
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.verify_planner import plan_verify_lengths

__all__ = [
    "BlockManager",
    "CapacityExceeded",
    "DSparkError",
    "DeadlineExceeded",
    "EngineDead",
    "InvalidRequest",
    "ModelLoadError",
    "ModelRunnerOutput",
    "Request",
    "RequestFailed",
    "RequestStatus",
    "RequestUpdate",
    "SamplingParams",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "StructuredOutput",
    "TokenLogprob",
    "plan_verify_lengths",
]
