"""User-facing errors: one line naming the problem and the fix; the CLI turns them into exit code 2."""


class SensqError(Exception):
    """A problem with the user's input (model, config, data). Printed as one line, exit code 2, no traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} -- {fix}" if fix else problem)

