"""The service's log: one line per record, as text or as JSON (`log_format`), and one line per
lifecycle transition, with the container id and runtime as fields of their own."""

from __future__ import annotations

import datetime
import json
import logging
import os
import time

from adapter.core.events import Event

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The `extra` fields a record may carry; each becomes a JSON key, or key=value in text.
FIELDS = ("container_id", "runtime", "state", "reason", "rpc", "code")
lifecycle_log = logging.getLogger("containerizer.lifecycle")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, the fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class TextFormatter(logging.Formatter):
    """The classic line, then the fields as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        # The last second formatted, and its text: a line per transition is on every launch's
        # path, and strftime of the same second over again cost a fifth of each line.
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """Formatter.formatTime's text, the date and time part formatted once per second."""
        if datefmt is not None or self.default_msec_format is None:
            return super().formatTime(record, datefmt)
        second, text = self._second  # one read: a worker thread's record may replace it
        if second != int(record.created):
            second = int(record.created)
            text = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, text)
        return self.default_msec_format % (text, record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{key}={value}" for key, value in _fields(record).items())
        if not fields:
            return text
        first, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{first} {fields}{newline}{rest}"


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {key: getattr(record, key) for key in FIELDS if getattr(record, key, None)}


def configure_logging(log_format: str) -> None:
    """The root logger's one handler (stderr, which systemd's journal takes) in `log_format`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    # What no line of ours prints, not gathered for each record (a line per transition is on
    # every launch's path): the thread, process and multiprocessing names.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Nor the caller's file, line and function (a walk up the stack per record): the
    # documented switch of logging's "Optimization" notes.
    logging._srcfile = None
    logging.basicConfig(
        level=os.environ.get("CONTAINERIZER_LOG_LEVEL", "INFO"), handlers=[handler], force=True
    )


def log_transition(event: Event) -> None:
    """An EventHub observer: one line per checkpointed transition."""
    fields: dict[str, object] = {
        "container_id": event.container_id,
        "runtime": event.runtime,
        "state": event.state.value,
    }
    outcome = ""
    if event.termination is not None:
        fields["reason"] = event.termination.reason.value
        outcome = f": {event.termination.message}" if event.termination.message else ""
    lifecycle_log.info(
        "container %s %s%s", event.container_id, event.state.value, outcome, extra=fields
    )
