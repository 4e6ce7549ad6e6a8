"""The error hierarchy shared by every layer; the server maps each class to an HTTP status."""


class DSparkError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidRequest(DSparkError, ValueError):
    """The request itself is wrong (HTTP 400). `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class CapacityExceeded(DSparkError):
    """The engine cannot take more work right now (HTTP 429)."""


class RequestFailed(DSparkError):
    """The engine could not compute this one request (HTTP 500); the others go on."""


class DeadlineExceeded(DSparkError):
    """The request ran past the server's --request-timeout (HTTP 504; in-band when streaming)."""


class EngineDead(DSparkError):
    """The engine loop stopped and cannot serve (HTTP 503)."""


class ModelLoadError(DSparkError):
    """A model path is missing, unsupported or corrupt."""
