"""Named errors of the core and the exit status each one maps to."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_TEMPFAIL = 75


class DtsError(Exception):
    """Base of every error the core raises on purpose; carries its exit status."""

    exit_code = EXIT_FAILED


class ConfigError(DtsError):
    """The configuration is unusable: names the file, the key and the reason."""

    exit_code = EXIT_USAGE

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


class UsageError(DtsError):
    """A command-line argument is wrong (unknown job, bad duration, ...)."""

    exit_code = EXIT_USAGE


class SpoolError(DtsError):
    """The spool cannot be used (not one filesystem, not writable, ...)."""

    exit_code = EXIT_USAGE


class TemporaryFailure(DtsError):
    """A peer or the container engine is down; trying again later may work."""

    exit_code = EXIT_TEMPFAIL


class JobFailed(DtsError):
    """A job could not be processed and was (or is to be) moved to failed/."""

    exit_code = EXIT_FAILED
