"""Every user-facing failure is an NvqError: one sentence naming the file, tensor or value and
what is allowed. The CLI prints it and exits with `exit_code` (2 = bad input or usage)."""


class NvqError(Exception):
    exit_code = 2


class ConfigError(NvqError):
    """config.json missing, malformed, or lacking a field the architecture needs."""


class CheckpointError(NvqError):
    """A weight file is missing, unreadable, truncated, or its header disagrees with its data."""


class TensorError(NvqError):
    """A tensor's values or shape cannot be quantized (NaN/Inf, K not a multiple of the group)."""


class UnknownArchitectureError(NvqError):
    """The model_type has no module in nvq.models."""


class UnmappedTensorError(NvqError):
    """A source tensor is neither mapped, nor dropped on purpose, by the architecture's table."""


class RecipeError(NvqError):
    """A recipe file is malformed or asks for something the target engines cannot load."""


class OutputExistsError(NvqError):
    """The output directory exists and --force was not given."""


class KernelBuildError(NvqError):
    """The CUDA kernels cannot be built or loaded (no nvcc, no GPU or --arch, a compile error)."""


class OutputWriteError(NvqError):
    """The output cannot be written: disk full, read-only, no permission."""
