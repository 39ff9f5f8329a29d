"""The task-action interface: what a storage task does to one study.

Built-in actions (``archive``, ``move``, ``delete``) and third-party ones subclass
:class:`Action` and register through
:func:`~studyvault.hookspecs.studyvault_register_actions`. An action works only through
the :class:`ActionContext` it is given, which runs the engine's safe transfer protocol
and writes the index and audit log; an action never touches either directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Protocol

from .storage import Role

if TYPE_CHECKING:
    from .records import StudyRecord
    from .storage import Storage


class ActionContext(Protocol):
    """What the task runner offers an action for one study."""

    task: str
    source: Storage
    destination: Storage | None

    def transfer(self, study: StudyRecord, *, op: str, keep_in_list: bool = True) -> StudyRecord:
        """Move the study from ``source`` to ``destination`` through the safe transfer
        protocol (journal, staging, fsync, verify, publish, commit, remove source).

        :param op: the operation's name for the journal and audit log.
        :param keep_in_list: False removes the study from the study list once it is
            safely in the destination (a move out of studyvault).
        """
        ...

    def copy(self, study: StudyRecord, destination: Storage) -> None:
        """Copy the study to another storage through the safe transfer protocol, keeping
        the source; the verified copy is recorded in the index as one more of the
        study's ``copies``."""
        ...

    def delete(self, study: StudyRecord) -> None:
        """Delete the study's copy in ``source`` (audit line first, then files, then
        index entries)."""
        ...

    def verify(self, study: StudyRecord) -> list[str]:
        """Re-read every instance of the study's copy in ``source`` and compare it with
        its recorded SHA-256; changes nothing.

        :returns: one line per missing, changed, unreadable or unknown file; empty when
            the copy is whole.
        """
        ...


class Action(ABC):
    """Base class of task actions."""

    #: unique name used in config and on the command line (``--action NAME``)
    name: ClassVar[str]
    #: verb for task descriptions: "Archive" -> "Archive studies older than 7 years ..."
    verb: ClassVar[str]
    #: roles the task's ``from`` storage may have
    source_roles: ClassVar[tuple[Role, ...]] = (Role.IMAGE_DIRECTORY,)
    #: roles the ``to`` storage may have; empty means the action takes no destination
    destination_roles: ClassVar[tuple[Role, ...]] = ()
    #: word a user must type to run the task (``--confirm WORD``), or None
    confirm_word: ClassVar[str | None] = None

    @abstractmethod
    def run(self, ctx: ActionContext, study: StudyRecord) -> None:
        """Apply the action to one study. Raise a
        :class:`~studyvault.errors.StudyvaultError` to count an error for this study;
        the run goes on with the next one."""
