"""The one error type the export pipeline raises for problems a user can fix."""


class ExportError(Exception):
    """A clear, user-facing failure: the message says what is wrong and what to do."""
