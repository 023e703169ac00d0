"""Error types: every one names the file, the expected and found values, and the fix."""

from __future__ import annotations


class SopranoOnnxError(Exception):
    """Base class for errors raised by this package."""


class CheckpointError(SopranoOnnxError):
    """A checkpoint directory is missing files or holds something of the wrong shape."""


class ExportError(SopranoOnnxError):
    """An export could not be produced or validated."""


class ParityError(SopranoOnnxError):
    """A parity metric missed its threshold."""


class ModelFileError(SopranoOnnxError):
    """An ONNX / IR file or its JSON config is missing, corrupted or inconsistent."""


class MissingBackendError(SopranoOnnxError, ImportError):
    """An optional backend package is not installed."""


class InputError(SopranoOnnxError, ValueError):
    """Bad user input (text, sampling parameters)."""


class UnsupportedCpuError(ModelFileError):
    """A model that this CPU cannot run as converted (a bf16 model without bf16 instructions)."""
