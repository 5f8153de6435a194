"""The one exception type for bad input: its message names the problem and the fix on one line."""


class UserError(Exception):
    """Bad input from the user (path, name, option). The CLI prints the message without a traceback."""


class TrainingDiverged(UserError):
    """Training a network on a set went non-finite; a caller that knows which option made the set says so."""


class Diverged(UserError):
    """The distillation produced NaN/inf (or a non-positive step size); `run_distillation` adds how to go on."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name if it has none), at most `limit` characters: the
    reason a one-line UserError quotes."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
