"""The ``copy`` task action: a second, verified copy of each archived study.

``studyvault tasks add "Second Copy" --action copy --from "My Study Archive"
--to "Offsite Archive" --all`` copies every study of the first archive into the
second one. The copy runs through the engine's safe transfer protocol
(:meth:`studyvault.ActionContext.copy`): staged, fsynced, every file checked against
its recorded SHA-256, published atomically, then recorded in the index as a second
copy. Nothing is deleted: the source archive keeps its copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from studyvault import Action, ActionContext, Role, StudyRecord, hookimpl


class SecondCopyAction(Action):
    """Copy a study from one archive to another, keeping the source copy."""

    name = "copy"
    verb = "Copy"
    source_roles: ClassVar[tuple[Role, ...]] = (Role.ARCHIVE,)
    destination_roles: ClassVar[tuple[Role, ...]] = (Role.ARCHIVE,)

    def run(self, ctx: ActionContext, study: StudyRecord) -> None:
        destination = ctx.destination
        assert destination is not None  # the task runner requires --to for this action
        if destination.id in study.copies:
            return  # copied by an earlier run: a weekly task only copies what is new
        ctx.copy(study, destination)


@hookimpl
def studyvault_register_actions(register: Callable[[type[Action]], None]) -> None:
    register(SecondCopyAction)
