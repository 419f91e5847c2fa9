"""Errors a user can cause. The CLI turns each into one line and a non-zero exit."""


class EdgepropError(Exception):
    """Base class: a problem with the user's input, files or settings, not a bug."""


class ConfigError(EdgepropError):
    """A setting is out of range or inconsistent."""


class CheckpointError(EdgepropError):
    """A checkpoint is missing, corrupt, from a future format, or for another model."""


class AudioError(EdgepropError):
    """An audio file or stream cannot be used (rate, channels, corrupt, NaN...)."""


class DatasetError(EdgepropError):
    """A dataset folder is missing or not in the Speech Commands layout."""


class DeviceError(EdgepropError):
    """An audio device cannot be opened (none present, bad index...)."""


class ProtocolError(EdgepropError):
    """A wire message is malformed, of the wrong version, shape or config."""
