"""The built-in task actions: archive, move and delete.

They use only the public :class:`~studyvault.actions.ActionContext`, exactly as a
third-party action would; the safe transfer protocol lives in the engine.
"""

from __future__ import annotations

from typing import ClassVar

from studyvault import Action, ActionContext, Role, StudyRecord, hookimpl


class ArchiveAction(Action):
    """Image directory -> archive. The study stays listed, as archived, and can be
    fetched back."""

    name = "archive"
    verb = "Archive"
    destination_roles: ClassVar[tuple[Role, ...]] = (Role.ARCHIVE,)

    def run(self, ctx: ActionContext, study: StudyRecord) -> None:
        ctx.transfer(study, op="archive")


class MoveAction(Action):
    """Image directory -> image directory (stays online), or -> archive, in which
    case the study leaves studyvault's study list but stays whole in the archive."""

    name = "move"
    verb = "Move"
    destination_roles: ClassVar[tuple[Role, ...]] = (Role.IMAGE_DIRECTORY, Role.ARCHIVE)

    def run(self, ctx: ActionContext, study: StudyRecord) -> None:
        assert ctx.destination is not None
        if ctx.destination.role is Role.ARCHIVE:
            ctx.transfer(study, op="move-out", keep_in_list=False)
        else:
            ctx.transfer(study, op="move")


class DeleteAction(Action):
    """Delete the study's files and index entries (confirmed by typing DELETE)."""

    name = "delete"
    verb = "Delete"
    source_roles: ClassVar[tuple[Role, ...]] = (Role.IMAGE_DIRECTORY, Role.ARCHIVE)
    confirm_word = "DELETE"

    def run(self, ctx: ActionContext, study: StudyRecord) -> None:
        ctx.delete(study)


@hookimpl
def studyvault_register_actions(register):  # type: ignore[no-untyped-def]
    register(ArchiveAction)
    register(MoveAction)
    register(DeleteAction)
