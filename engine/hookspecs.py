"""The hooks a studyvault plugin can implement: the contract with plugin authors.

Registration hooks are called once, when :func:`studyvault.manager.load_plugins` runs.
Event hooks are called after the index commit of the operation they report, so a
plugin always sees a study that is safely where the event says; an exception raised
by an event hook is logged and never undoes the operation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .actions import Action
    from .alerts import Alert
    from .records import StudyRecord
    from .storage import Storage

PROJECT = "studyvault"

_hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@_hookspec
def studyvault_register_storage_kinds(register: Callable[[type[Storage]], None]) -> None:
    """Register storage kinds (backends), e.g. ``register(FolderArchive)``.

    Called once while plugins load. Each class has a unique ``kind`` class variable;
    a kind registered by two plugins is an error that names both.

    :param register: call it with each :class:`~studyvault.storage.Storage` subclass.
    """


@_hookspec
def studyvault_register_actions(register: Callable[[type[Action]], None]) -> None:
    """Register storage-task actions, e.g. ``register(ArchiveAction)``.

    Called once while plugins load. Each class has a unique ``name`` class variable;
    an action registered by two plugins is an error that names both.

    :param register: call it with each :class:`~studyvault.actions.Action` subclass.
    """


@_hookspec
def studyvault_study_received(study: StudyRecord, storage: Storage, source: str) -> None:
    """New instances of a study were stored and indexed.

    Called after the index commit of an import or a network receive, once per study
    per batch of instances.

    :param study: the study's record as now indexed.
    :param storage: the image directory that holds the new instances.
    :param source: ``"import"`` or ``"network:<calling AE title>"``.
    """


@_hookspec
def studyvault_study_archived(
    study: StudyRecord, source: Storage, destination: Storage, task: str | None
) -> None:
    """A study was archived: its verified copy in ``destination`` is committed and the
    online copy in ``source`` removed.

    :param study: the study's record after the commit.
    :param source: the image directory the study left.
    :param destination: the archive that now holds it.
    :param task: the storage task's name, or ``None`` when not run by a task.
    """


@_hookspec
def studyvault_study_moved(
    study: StudyRecord, source: Storage, destination: Storage, task: str | None
) -> None:
    """A study was moved between storages (and, into an archive, out of the study list).

    :param study: the study's record at the time of the move.
    :param source: the storage the study left.
    :param destination: the storage that now holds it.
    :param task: the storage task's name, or ``None``.
    """


@_hookspec
def studyvault_study_deleted(study: StudyRecord, storage: Storage, task: str | None) -> None:
    """A study's files and index entries were deleted (after the audit line was written).

    :param study: the record of the study as it was before deletion.
    :param storage: the storage whose copy was deleted.
    :param task: the storage task's name, or ``None``.
    """


@_hookspec
def studyvault_study_fetched(study: StudyRecord, source: Storage, destination: Storage) -> None:
    """An archived study was fetched back online (the archive keeps its copy).

    :param study: the study's record, with ``fetched_until`` set.
    :param source: the archive it came from.
    :param destination: the image directory that now holds the online copy.
    """


@_hookspec
def studyvault_study_returned(study: StudyRecord, source: Storage, destination: Storage) -> None:
    """A fetched study's time was up and its online copy returned to the archive.

    :param study: the study's record after the return.
    :param source: the image directory the online copy left.
    :param destination: the archive that holds the (possibly merged) study.
    """


@_hookspec
def studyvault_alert(alert: Alert) -> None:
    """``studyvault serve`` produced an alert message: a problem, a reminder that it
    lasts, its resolution (see docs/operations.md).

    Called once per message, after the configured channels were tried, so a plugin can
    route alerts further (an SMS gateway, a ticket system); when a plugin implements
    this hook, messages are produced even without an email or webhook channel.

    :param alert: the message: ``event`` (problem | reminder | resolved), ``key``
        (``<kind>:<subject>``), ``severity``, ``title``, ``details``, ``action``;
        ``subject()`` and ``body()`` give the text the channels send.
    """
