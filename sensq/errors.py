"""User-facing errors: one line naming the problem and the fix; the CLI turns them into exit code 2."""


class SensqError(Exception):
    """A problem with the user's input (model, config, data). Printed as one line, exit code 2, no traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} -- {fix}" if fix else problem)

class RuntimeRejected(SensqError):
    """The target runtime cannot compile or run this (quantized) model: a fact about the plan on that runtime, not
    a crash of sensq. The search records the plan as rejected and goes on; elsewhere it is a one-line error."""
