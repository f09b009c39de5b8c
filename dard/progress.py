"""Progress bars (tqdm to stderr), drawn only on a terminal: switched off for tests, Ray workers,
and whenever stderr is a file or a pipe (``dard demo 2>&1 | tee log`` gets no ``\r`` frames)."""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Iterator


class _Bar:
    """``tick``: redraw every ``tick`` seconds, so that elapsed time moves during a long unit
    (one AutoAttack attack can take a minute on a CPU)."""

    def __init__(self, total: int | None, desc: str, enabled: bool, tick: float | None = None):
        self._bar = None
        self._stop = threading.Event()
        if enabled and _terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
            if tick:
                threading.Thread(target=self._tick, args=(tick,), daemon=True).start()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            self._bar.refresh()

    def note(self, **postfix) -> None:
        """Show ``postfix`` without advancing."""
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=True)

    def update(self, n: int = 1, **postfix) -> None:
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
