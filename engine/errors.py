"""Errors studyvault raises. The CLI prints each as one line and exits with status 2."""

from __future__ import annotations


class StudyvaultError(Exception):
    """Base of every error studyvault reports to a user."""

    exit_code = 2


class ConfigError(StudyvaultError, ValueError):
    """The config file is missing, unreadable or has a bad value (names file and field)."""


class PluginError(StudyvaultError, RuntimeError):
    """A plugin could not be loaded or registered something invalid."""


class UnknownStorageError(StudyvaultError, LookupError):
    """No image directory or archive has that name."""


class UnknownStudyError(StudyvaultError, LookupError):
    """No study with that StudyInstanceUID is in the index."""


class UnknownTaskError(StudyvaultError, LookupError):
    """No storage task has that name."""


class UnknownActionError(StudyvaultError, LookupError):
    """No plugin provides that task action."""


class NotDicomError(StudyvaultError, ValueError):
    """A file is not DICOM, is truncated, or lacks a required UID."""


class StorageError(StudyvaultError, OSError):
    """A storage refused or failed an operation."""


class StorageFullError(StorageError):
    """Storing would leave less free space than the storage's reserve."""


class StorageOfflineError(StorageError):
    """The storage's folder (or endpoint) cannot be reached, or it is unmounted."""


class IntegrityError(StudyvaultError, ValueError):
    """A copy does not match the SHA-256 recorded in the index."""


class IndexCorruptError(StudyvaultError, RuntimeError):
    """The LMDB index cannot be opened or read; `studyvault index rebuild` recreates it."""


class IndexMissingError(IndexCorruptError):
    """The index is missing (or new and empty) while a storage holds studies: it was
    deleted or lost, not empty; `studyvault index rebuild` recreates it."""


class StorageInUseError(StudyvaultError, RuntimeError):
    """A storage cannot be removed: a storage task still names it."""


class TaskError(StudyvaultError, RuntimeError):
    """A storage task is invalid or cannot run now."""


class ConfirmationRequired(StudyvaultError, PermissionError):
    """A destructive command was not confirmed by typing the required word."""


class ServiceError(StudyvaultError, RuntimeError):
    """``studyvault serve`` cannot start: another one runs, or its port is taken."""
