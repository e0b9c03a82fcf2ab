"""Typed errors. Every error reftkit raises on bad input is a subclass of `ReftkitError`, and its message
says what was expected and how to fix it. The CLI prints `error: <message>` for these and exits 2."""

from __future__ import annotations


class ReftkitError(Exception):
    """Base class of every error reftkit raises on purpose."""


class ModelNotFoundError(ReftkitError):
    """A model name is neither built in nor a local folder or .gguf file."""


class MissingDependencyError(ReftkitError):
    """An optional package (a model wheel, matplotlib, peft, ...) is not installed."""


class CacheError(ReftkitError):
    """A cached model conversion is unreadable; it is rebuilt rather than used."""


class SiteError(ReftkitError, ValueError):
    """A site (layer + component, or module path) cannot be resolved on this model."""


class PositionError(ReftkitError, ValueError):
    """A positions selector is malformed or points outside the sequence."""


class InterventionError(ReftkitError, ValueError):
    """An intervention got inputs of the wrong shape, dtype or device, or is misconfigured."""


class SourceError(ReftkitError, ValueError):
    """A source run is missing or does not match the base run."""


class ConfigError(ReftkitError, ValueError):
    """A config (JSON/YAML) is malformed, names an unknown registry entry, or has a wrong format version."""


class IncompatibleModelError(ReftkitError, ValueError):
    """Saved interventions do not fit the model they are loaded onto (hidden size, layers, architecture)."""


class DataError(ReftkitError, ValueError):
    """A dataset row is missing fields, the dataset is empty, or an example is too long."""


class OutputError(ReftkitError, OSError):
    """An output folder cannot be used: it is not writable, the disk is full, or it holds an earlier run that
    neither `resume` nor `overwrite` was asked to continue or replace."""
