"""The errors a user can fix, kept apart from the config sections so that code needing torch alone (the models, on a
GPU machine without pydantic) can raise them."""


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
        stack.extend([cause, e.__cause__, getattr(e, "controller_failure", None),
                      *getattr(e, "worker_failures", {}).values()])
    return None


class ConfigError(JobError, ValueError):
    """A config file or override that cannot be used; the message names the key and the file."""
