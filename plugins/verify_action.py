"""The built-in ``verify`` task action: re-read a study's files on a schedule.

``studyvault tasks add "Weekly check" --action verify --from "My Study Archive" --all
--days Su --hours 01:00-05:00`` verifies, every Sunday night, that each study's files
still match the SHA-256 recorded when they were stored. A study with a missing,
changed, unreadable or unknown file counts as an error of the run, with the problems
in its message; nothing is changed.
"""

from __future__ import annotations

from typing import ClassVar

from studyvault import Action, ActionContext, Role, StudyRecord, hookimpl
from studyvault.errors import IntegrityError


class VerifyAction(Action):
    """Compare every instance of the study in ``from`` with its recorded SHA-256."""

    name = "verify"
    verb = "Verify"
    source_roles: ClassVar[tuple[Role, ...]] = (Role.IMAGE_DIRECTORY, Role.ARCHIVE)

    def run(self, ctx: ActionContext, study: StudyRecord) -> None:
        problems = ctx.verify(study)
        if problems:
            shown = "; ".join(problems[:5])
            more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise IntegrityError(f"{ctx.source.name}: {len(problems)} problem(s): {shown}{more}")


@hookimpl
def studyvault_register_actions(register):  # type: ignore[no-untyped-def]
    register(VerifyAction)
