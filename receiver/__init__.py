"""ci-receiver: receive Tencent Cloud Infinite (CI, 数据万象) job callbacks and act on them.

>>> from receiver import parse_callback, PayloadError
>>> events = parse_callback(body, headers)   # list[Event], or PayloadError
"""

from receiver.events import parse_callback
from receiver.model import Event, Moderation, ObjectRef, Task, WorkflowRef
from receiver.payload import Limits, PayloadError

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
