"""The `Event` and its parts by the module name handler packages imported them from
before the layout by stage (the README's example did: `from receiver.model import Event`),
so that a plugin installed then still loads. They live in receiver/callback/event.py; new
code imports them from the package: `from receiver import Event`."""

import warnings

from receiver.callback.event import Event, Moderation, ObjectRef, Task, WorkflowRef

__all__ = ["Event", "Moderation", "ObjectRef", "Task", "WorkflowRef"]

warnings.warn(
    "receiver.model is the former name of receiver.callback.event: import Event from receiver",
    DeprecationWarning,
    stacklevel=2,
)
