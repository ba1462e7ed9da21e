"""ci-receiver: receive Tencent Cloud Infinite (CI, 数据万象) job callbacks and act on them.

>>> from receiver import parse_callback, PayloadError
>>> events = parse_callback(body, headers)   # list[Event], or PayloadError
"""

from receiver.callback.decode import Limits, PayloadError
from receiver.callback.event import Event, Moderation, ObjectRef, Task, WorkflowRef
from receiver.callback.normalize import parse_callback

__all__ = [
    "Event",
    "Limits",
    "Moderation",
    "ObjectRef",
    "PayloadError",
    "Task",
    "WorkflowRef",
    "parse_callback",
]
