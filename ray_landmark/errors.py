"""The errors a user can fix, kept apart from the config sections so that code needing torch alone (the models, on a
GPU machine without pydantic) can raise them."""

import re
import sys


class JobError(Exception):
    """A problem the user can fix (config, storage, checkpoint, embedding files): jobs end with its one-line message,
    which names the key, file or URI and what to do."""


def user_error(err: BaseException) -> JobError | None:
    """The JobError at the root of an exception, also one raised in a Ray task or actor, a Ray Train worker or
    controller, or a Tune trial and re-raised here wrapped in Ray's own errors; None when there is none."""
    stack, seen = [err], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a RayTaskError is also an instance of its cause's class: prefer the cause
        if isinstance(e, JobError) and not isinstance(cause, JobError):
            return e
        if getattr(e, "actor_init_failed", False):  # Ray's ActorDiedError keeps only the text of __init__'s error
            found = _job_error_in_text(str(e))
            if found is not None:
                return found
        stack.extend([cause, e.__cause__, getattr(e, "controller_failure", None),
                      *getattr(e, "worker_failures", {}).values()])
    return None


# The last line of a traceback in an error's text: ``package.module.ErrorClass: message``.
_RAISED = re.compile(r"^(?P<module>[A-Za-z_][\w.]*)\.(?P<name>[A-Za-z_]\w*): (?P<message>.+)$", re.MULTILINE)


def _job_error_in_text(text: str) -> JobError | None:
    """The JobError a traceback's text ends with (an actor's ``__init__`` raised it: a Ray Data map worker that loads
    a model, say), rebuilt from its module and class; None when the text names no JobError of this project."""
    for match in reversed(list(_RAISED.finditer(text))):
        module = sys.modules.get(match["module"])
        cls = getattr(module, match["name"], None) if module else None
        if isinstance(cls, type) and issubclass(cls, JobError):
            try:
                return cls(match["message"].strip())
            except TypeError:  # a subclass that takes other arguments
                return JobError(match["message"].strip())
    return None


class ConfigError(JobError, ValueError):
    """A config file or override that cannot be used; the message names the key and the file."""
