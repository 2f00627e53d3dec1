"""User-facing errors.

Every error a user can cause derives from :class:`PneumonetError`; the CLI and the job
entrypoints print its message alone (no traceback) and exit non-zero, so each message must
name the file, URI or key at fault and say what to do.
"""


class PneumonetError(Exception):
    """An error caused by input or environment, reported to the user as one clear message."""


class ConfigError(PneumonetError):
    """A configuration key is unknown, missing or has a bad value."""


class StorageError(PneumonetError):
    """A local path or ``s3://`` URI cannot be read or written."""


class ImageDecodeError(PneumonetError):
    """A file is not an image we can decode (corrupt, truncated, empty, too large)."""


class DataError(PneumonetError):
    """A dataset is unusable: no images, a missing class, an empty split."""


class ArtifactError(PneumonetError):
    """A model artifact is missing, incomplete or inconsistent."""


class WeightsError(PneumonetError):
    """Backbone weights are missing, unreadable or do not fit the architecture."""


class TrackingError(PneumonetError):
    """Experiment tracking (W&B) is misconfigured, e.g. a bad API key in online mode."""


class RegistryError(PneumonetError):
    """A model version or alias is unknown, or a promotion is refused (see :mod:`pneumonet.registry`)."""


class ConflictError(RegistryError):
    """Another promotion moved the alias at the same time; nothing was changed by this one."""
