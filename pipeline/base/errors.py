"""One exception hierarchy for kdpipe.

Every message is written for the person running the command: it names the
file, option or value at fault. Each class also inherits the matching builtin
so callers that catch ``FileNotFoundError`` or ``ValueError`` keep working.
"""


class KdpipeError(Exception):
    """Base of every error kdpipe raises on purpose."""


class UsageError(KdpipeError, ValueError):
    """An option value that can never work (T <= 0, alpha outside [0, 1] ...)."""


class DatasetError(KdpipeError, ValueError):
    """A dataset that cannot be found, fetched or read."""


class ModelError(KdpipeError, ValueError):
    """An unknown architecture or a model that cannot be built."""


class OutputExistsError(KdpipeError, FileExistsError):
    """An output path exists and ``--overwrite`` was not given."""


class RunDirError(KdpipeError, FileNotFoundError):
    """A run directory that is missing, incomplete or not kdpipe's."""


class TrainingDivergedError(KdpipeError, ArithmeticError):
    """The training loss became NaN or infinite."""


class CacheError(KdpipeError):
    """Base for problems with a soft-label cache."""


class NotACacheError(CacheError, FileNotFoundError):
    """A path that is not a kdpipe cache."""


class CacheIncompleteError(CacheError):
    """A cache whose status is not ``complete``."""


class CacheMismatchError(CacheError, ValueError):
    """A cache that does not belong to the dataset or model it is used with."""


class ManifestError(CacheError, ValueError):
    """A manifest or run JSON that does not follow its schema."""


class TeacherOutputError(CacheError, ValueError):
    """A teacher produced NaN or Inf outputs."""


class ExportError(KdpipeError, ValueError):
    """A model that cannot be exported or quantized, or an ONNX file that is not kdpipe's."""
