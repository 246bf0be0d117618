"""Progress: a tqdm bar (terminal or notebook) or, when nobody watches, a line every few seconds."""

from __future__ import annotations

import sys
import time


def _interactive() -> bool:
    if sys.stderr.isatty():
        return True
    try:  # a Jupyter kernel has no TTY but renders tqdm.auto widgets
        from IPython import get_ipython

        return get_ipython() is not None and "IPKernelApp" in get_ipython().config
    except Exception:
        return False


class Progress:
    def __init__(self, total_rows: int | None, total_shards: int, done_rows: int,
                 done_shards: int, enabled: bool = True, interval_s: float = 5.0) -> None:
        self.enabled = enabled
        self.total_rows = total_rows
        self.total_shards = total_shards
        self.rows = done_rows
        self.shards = done_shards
        self.failed = 0
        self.started = time.monotonic()
        self.start_rows = done_rows
        self.interval_s = interval_s
        self._last_line = 0.0
        self.bar = None
        if enabled and _interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_rows, initial=done_rows, unit="rows", unit_scale=True,
                            dynamic_ncols=True, smoothing=0.1)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            extra = f", {self.failed} failed" if self.failed else ""
            self.bar.set_postfix_str(f"shards {self.shards}/{self.total_shards}{extra}")

    def commit(self, rows: int) -> None:
        self.rows += rows
        self.shards += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(rows)
            self._postfix()
        elif time.monotonic() - self._last_line >= self.interval_s or \
                self.shards == self.total_shards:
            self._line()

    def shard_failed(self) -> None:
        self.failed += 1
        self._postfix()

    def tick(self) -> None:
        """Called often by the runner: a plain line every few seconds even between commits."""
        if self.enabled and self.bar is None and \
                time.monotonic() - self._last_line >= self.interval_s:
            self._line()

    def _line(self) -> None:
        self._last_line = time.monotonic()
        elapsed = max(1e-9, time.monotonic() - self.started)
        rate = (self.rows - self.start_rows) / elapsed
        total = f"/{self.total_rows}" if self.total_rows is not None else ""
        eta = ""
        if self.total_rows and rate > 0:
            eta = f", ETA {max(0.0, (self.total_rows - self.rows) / rate):.0f}s"
        failed = f", {self.failed} failed" if self.failed else ""
        print(f"progress: {self.rows}{total} rows, shards {self.shards}/{self.total_shards}"
              f"{failed}, {rate:,.0f} rows/s{eta}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Console:
    """The CLI's and a notebook's presentation: progress while the job runs (a bar, or a line
    every few seconds when nobody watches), the summary when it ends."""

    def __init__(self, show_progress: bool = True) -> None:
        self.show_progress = show_progress

    def progress(self, total_rows: int | None, total_shards: int, done_rows: int,
                 done_shards: int) -> Progress:
        return Progress(total_rows, total_shards, done_rows, done_shards,
                        enabled=self.show_progress)

    def summary(self, lines: list[str]) -> None:
        print("\n".join(lines), flush=True)

    def note(self, line: str) -> None:
        """A line while the job waits or runs (always shown: it says why nothing moves)."""
        print(line, flush=True)


class Silent(Console):
    """No output at all: tests, benchmarks and callers that read the report themselves."""

    def __init__(self) -> None:
        super().__init__(show_progress=False)

    def summary(self, lines: list[str]) -> None:
        pass

    def note(self, line: str) -> None:
        pass
