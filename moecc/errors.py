"""User-facing errors: one clear line, non-zero exit, nothing half-written."""


class MoeccError(Exception):
    """A user-facing error: one clear line, non-zero exit."""
