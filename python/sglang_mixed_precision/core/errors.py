"""The project's one error type: every problem a user can fix names where it is and how to fix it."""

from __future__ import annotations


class MixedPrecisionError(ValueError):
    """A problem with the user's config, checkpoints or launch arguments.

    ``code`` is a stable identifier (tests and tools match on it); ``where`` names the file,
    tensor, module or rule at fault; ``fix`` says what to do about it.
    """

    def __init__(self, code: str, message: str, *, where: str | None = None, fix: str | None = None):
        self.code = code
        self.detail = message
        self.where = where
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [f"[{self.code}] {self.detail}"]
        if self.where:
            parts.append(f"  at: {self.where}")
        if self.fix:
            parts.append(f"  fix: {self.fix}")
        return "\n".join(parts)


class PlanErrors(MixedPrecisionError):
    """Several independent problems found in one validation pass, reported together."""

    def __init__(self, errors: list[MixedPrecisionError]):
        self.errors = list(errors)
        lines = [f"{len(self.errors)} problem(s) found before launch:"]
        lines += [str(e) for e in self.errors]
        super().__init__("plan_invalid", "\n".join(lines))

    def _render(self) -> str:
        return self.detail

    @property
    def codes(self) -> list[str]:
        return [e.code for e in self.errors]
