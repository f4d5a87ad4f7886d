"""stepcache's errors: one family, so callers can catch ours apart from everything else."""

__all__ = [
    "InvalidAnnotation",
    "InvalidDocument",
    "InvalidSetting",
    "StepcacheError",
    "StoreUnavailable",
    "Uncacheable",
]


class StepcacheError(Exception):
    """Base of every error stepcache raises on purpose."""


class InvalidSetting(StepcacheError):
    """A setting (environment variable) has a value the operator cannot run with."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class InvalidAnnotation(StepcacheError):
    """A user-written annotation cannot be understood; the pod runs uncached."""

    def __init__(self, name: str, value: str, reason: str) -> None:
        super().__init__(f"annotation {name}={value!r}: {reason}")
        self.name = name
        self.value = value
        self.reason = reason


class InvalidDocument(StepcacheError):
    """A file handed to the command line is not a Pod (or AdmissionReview) stepcache can read."""

    def __init__(self, source: str, field: str | None, reason: str) -> None:
        super().__init__(f"{source}: {field}: {reason}" if field else f"{source}: {reason}")
        self.source = source
        self.field = field
        self.reason = reason


class Uncacheable(StepcacheError):
    """The pod can run, but its result cannot be keyed or replayed (e.g. an offloaded Argo template)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreUnavailable(StepcacheError):
    """The database did not answer in time or failed; callers fail open."""
