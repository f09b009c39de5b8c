"""Progress: a bar (tqdm to stderr) on a terminal; elsewhere -- a file, a pipe, ``ray job logs``
-- a plain line every ``LINE_EVERY_S`` seconds while a long step runs (no ``\r`` frames), so a log
shows life. Off with ``--no-progress`` (``run.progress: false``), in tests and in Ray workers."""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

LINE_EVERY_S = 30.0  # off a terminal: one progress line this often


class _Bar:
    """``tick``: redraw every ``tick`` seconds, so that elapsed time moves during a long unit
    (one AutoAttack attack can take a minute on a CPU)."""

    def __init__(self, total: int | None, desc: str, enabled: bool, tick: float | None = None,
                 line_every: float = LINE_EVERY_S):
        self._bar = None
        self._stop = threading.Event()
        self._done, self._total, self._desc, self._started = 0, total, desc, time.monotonic()
        if enabled and _terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
            if tick:
                threading.Thread(target=self._tick, args=(tick,), daemon=True).start()
        elif enabled:
            threading.Thread(target=self._lines, args=(line_every,), daemon=True).start()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            self._bar.refresh()

    def _lines(self, every: float) -> None:
        while not self._stop.wait(every):
            elapsed = time.monotonic() - self._started
            done = f"{self._done}/{self._total}" if self._total else f"{self._done}"
            print(f"{self._desc}: {done} after {elapsed:.0f} s", file=sys.stderr, flush=True)

    def note(self, **postfix) -> None:
        """Show ``postfix`` without advancing."""
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=True)

    def update(self, n: int = 1, **postfix) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()},
                                      refresh=False)

    def close(self) -> None:
        self._stop.set()
        if self._bar is not None:
            self._bar.close()


def _terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool = True, tick: float | None = None) -> Iterator[_Bar]:
    bar = _Bar(total, desc, enabled, tick)
    try:
        yield bar
    finally:
        bar.close()
