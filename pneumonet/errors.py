"""User-facing errors.

Every error a user can cause derives from :class:`PneumonetError`; the CLI and the job
entrypoints print its message alone (no traceback) and exit non-zero, so each message must
name the file, URI or key at fault and say what to do.

Each error also has a ``kind``: a short, stable code that says which limit or defect it is, so that
a batch-scoring output can count its failures by cause (the ``error_kind`` column and the summary's
``failures_by_kind``) without parsing messages. The kinds of a file that cannot be scored:

``not_image`` skipped by its suffix, not read · ``unreadable`` missing, access denied, network ·
``empty`` 0 bytes · ``over_byte_limit`` ``data.max_image_bytes`` · ``over_pixel_limit``
``data.max_image_pixels`` or Pillow's bomb guard · ``decode_timeout`` ``data.max_decode_seconds`` ·
``unknown_format`` not JPEG, PNG, BMP, TIFF or DICOM · ``corrupt`` truncated or damaged ·
``unsupported`` a pixel mode, DICOM without pixels or without a codec · ``non_finite`` NaN or
infinite pixels · ``decoder_crash`` the decoder died or failed in an unexpected way (a bug to report).
"""


class PneumonetError(Exception):
    """An error caused by input or environment, reported to the user as one clear message."""

    kind = "error"

    def __init__(self, *args: object, kind: str | None = None) -> None:
        super().__init__(*args)
        if kind is not None:
            self.kind = kind


class ConfigError(PneumonetError):
    """A configuration key is unknown, missing or has a bad value."""


class StorageError(PneumonetError):
    """A local path or ``s3://`` URI cannot be read or written."""

    kind = "unreadable"


class ImageDecodeError(PneumonetError):
    """A file is not an image we can decode (corrupt, truncated, empty, too large); ``kind`` says which."""

    kind = "corrupt"


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
