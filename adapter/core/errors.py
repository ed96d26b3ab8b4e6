"""The closed set of errors the core and the drivers raise, each tied to one gRPC status code.

    ContainerizerError                  (INTERNAL)
    ├── InvalidArgument                 (INVALID_ARGUMENT)  bad input; names the field
    ├── NotFound                        (NOT_FOUND)         unknown container or image
    ├── AlreadyExists                   (ALREADY_EXISTS)    duplicate launch
    ├── FailedPrecondition              (FAILED_PRECONDITION) runtime not configured, wrong state
    ├── Unavailable                     (UNAVAILABLE)       runtime daemon unreachable / unhealthy
    ├── PermissionDenied                (PERMISSION_DENIED) a registry refused our credentials
    └── LaunchFailed                    (INTERNAL)          the runtime could not start it

The service maps by class (server/containers.py), the CLI maps status codes back; nobody matches
on message text. Drivers wrap their runtime's errors into the most specific class with
`raise ... from exc`.
"""

from __future__ import annotations


class ContainerizerError(Exception):
    """Base class; also the catch-all for internal faults."""


class InvalidArgument(ContainerizerError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(ContainerizerError):
    pass


class AlreadyExists(ContainerizerError):
    pass


class FailedPrecondition(ContainerizerError):
    pass


class Unavailable(ContainerizerError):
    pass


class PermissionDenied(ContainerizerError):
    pass


class LaunchFailed(ContainerizerError):
    pass


class ConfigError(Exception):
    """A config file that cannot be used: names the file, the key and what was expected."""
