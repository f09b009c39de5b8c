"""Console and log file: the console shows dard's own lines and errors (accuracies in one format,
:func:`percent`; errors in one line, :func:`one_line`); everything else
(library INFO/WARNING records, Python warnings) goes to ``dard.log`` in the run folder.
``--verbose`` shows everything on the console as well."""
from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

LOG_FILE = "dard.log"


def percent(fraction: float) -> str:
    """The one console format of an accuracy: ``71.3%``."""
    return f"{100 * fraction:.1f}%"


def one_line(err: BaseException) -> str:
    """One line for an error: its first line, or the last of a traceback quoted in its text."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if len(lines) > 1 and lines[0].startswith("Traceback"):  # a remote traceback: "ExcType: message" is last
        return lines[-1]
    return lines[0]


_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Console(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (test runners and callers may swap it)."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "dard" or record.name.startswith("dard.")
        if self.verbose:
            return record.levelno >= logging.INFO
        return (ours and record.levelno >= logging.WARNING) or record.levelno >= logging.ERROR


class _LazyFile(logging.FileHandler):
    def __init__(self, path: Path):
        super().__init__(path, delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


_installed: list[logging.Handler] = []
_pending = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
_pending.setFormatter(logging.Formatter(_FORMAT))


def setup(verbose: bool) -> None:
    """Route records: console (filtered) + a buffer that :func:`to_file` writes out. Idempotent."""
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
    _installed.clear()
    _pending.buffer.clear()
    _pending.setTarget(None)
    console = _Console(verbose)
    _installed.extend([console, _pending])
    for handler in _installed:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("dard").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger -> the file


def to_file(folder: str | Path) -> Path:
    """Write the log to ``folder/dard.log`` from now on (records so far included); returns its path.

    The file (and folder) appear with the first record: a command that stops at a bad input
    before anything logged writes nothing."""
    path = Path(folder) / LOG_FILE
    handler = _LazyFile(path)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.INFO)
    _pending.setTarget(handler)
    _pending.flush()
    _pending.setTarget(None)
    root = logging.getLogger()
    root.addHandler(handler)
    if _pending in _installed:  # buffered records are written; new ones go straight to the file
        root.removeHandler(_pending)
        _installed.remove(_pending)
    _installed.append(handler)
    return path
