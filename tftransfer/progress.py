"""How long work reports progress: a bar on a terminal, one line per step elsewhere.

`train.verbose: auto` (the default) means a Keras progress bar (`verbose=1`)
when standard output is a terminal or a notebook, and one line per epoch
(`verbose=2`) when it goes to a file or a CI log, where a bar's carriage
returns would fill the log with thousands of partial lines.
"""

import sys

VERBOSE_VALUES = ("auto", 0, 1, 2)


def interactive(stream=None):
    """True when `stream` (default stdout) is a terminal or we run in a notebook kernel."""
    stream = stream if stream is not None else sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def keras_verbose(value="auto", stream=None):
    """The `verbose` argument for `model.fit` / `evaluate` / `predict`.

    Args:
        value: `"auto"`, 0 (silent), 1 (progress bar) or 2 (one line per
            epoch). Defaults to `"auto"`: 1 on a terminal or in a notebook,
            else 2.
        stream: the output to test for a terminal. Defaults to stdout.

    Returns:
        int. 0, 1 or 2.
    """
    if value == "auto":
        return 1 if interactive(stream) else 2
    if value not in VERBOSE_VALUES:
        raise ValueError(f"verbose must be one of {VERBOSE_VALUES}. Received: verbose={value!r}.")
    return int(value)


class Progress:
    """Progress over `total` items of work: a bar when interactive, else a line per item.

    Example:
    ```python
    progress = Progress(total=12, what="cells")
    for cell in cells:
        ...
        progress.update(message="transfer k=2 seed 0: 0.81")
    ```
    """

    def __init__(self, total, what="items", stream=None, verbose="auto"):
        import time

        self.total, self.what, self.done = int(total), what, 0
        self.stream = stream if stream is not None else sys.stdout
        self.verbose = keras_verbose(verbose, self.stream)
        self.start = time.perf_counter()

    def update(self, count=1, message=""):
        import time

        self.done += count
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        status = f"{self.done}/{self.total} {self.what}, {elapsed:.0f}s elapsed, ~{left:.0f}s left"
        if self.verbose == 1:
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            bar = "=" * filled + "." * (width - filled)
            self.stream.write(f"\r[{bar}] {status} {message[:60]:<60}")
            if self.done >= self.total:
                self.stream.write("\n")
        elif self.verbose == 2:
            self.stream.write(f"{status}{': ' + message if message else ''}\n")
        self.stream.flush()
