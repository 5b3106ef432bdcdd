"""nextq's errors: one base class the CLI turns into one clear line and a non-zero exit."""


class NextqError(Exception):
    """Base class; the message names the thing and the expected vs actual value."""

    exit_code = 2


class UnsupportedModelError(NextqError):
    """The source is an architecture or configuration nextq cannot represent."""


class CheckpointError(NextqError):
    """Missing, extra, misshapen or corrupt tensors in a checkpoint or IR directory."""


class OutputExistsError(NextqError):
    """The output path exists and --force was not given."""


class BackendError(NextqError):
    """A backend cannot be chosen or cannot run the model."""


class RecipeError(NextqError):
    """A quantization recipe names an unknown tensor class or scheme, or a scheme a tensor cannot take."""


class CalibrationError(NextqError):
    """Calibration cannot run on the given text or windows (too short, no tokens reaching a layer)."""


class PublishError(NextqError):
    """Publishing to the Hub cannot start or did not complete (token, repo id, artifacts, reports, upload)."""


class InputError(NextqError):
    """A file read from disk is malformed: wrong type or structure, a value out of range, bad encoding."""


class UnsafePathError(InputError):
    """A name read from a file (shard, asset, upload) leaves its directory or is not a regular file."""
