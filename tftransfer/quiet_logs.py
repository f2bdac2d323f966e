"""Quiet entrypoint logs: hide TensorFlow's start-up chatter, keep what matters.

Every `python -m tftransfer.<entrypoint>` calls `install()` first, before
TensorFlow loads (importing `tftransfer` loads nothing, see its
`__init__`). By default the user then sees progress, our own `absl`
messages, metrics, warnings and errors, but not:

- TensorFlow's C++ notices (`I0000 ... port.cc] oneDNN custom operations
  are on`, CPU-instruction and CUDA-stub notices). TensorFlow 2.21 writes
  them through absl's C++ logging before `absl::InitializeLog()`, straight
  to file descriptor 2, and ignores `TF_CPP_MIN_LOG_LEVEL` for them; so they
  are filtered out of fd 2 line by line (C++ info and warning lines only;
  C++ error lines stay, except the CUDA probe's `failed call to cuInit` on a
  machine with no NVIDIA driver, which is not an error there);
- other libraries' Python INFO lines (TensorFlow's `signature_serialization`,
  `Assets written to`, fingerprints), by a filter on the `absl` and
  `tensorflow` loggers that lets INFO through only from tftransfer's modules.

Everything comes back with `TFTRANSFER_VERBOSE_LOGS=1` in the environment,
or with absl's `--verbosity=1` (or higher) on the command line.

Why a filter on fd 2 and not an environment variable: none silences those
lines on this stack (measured: `TF_CPP_MIN_LOG_LEVEL=3` still prints the
oneDNN and CUDA-stub notices, and `=3` would also hide real C++ errors).
"""

import atexit
import logging
import os
import re
import sys
import threading

ENV_VERBOSE = "TFTRANSFER_VERBOSE_LOGS"

# absl C++ log line: level letter, MMDD, time, thread id, source.cc:line] (absl
# Python logging has the same shape with a .py file: that is ours, and stays).
_CPP_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+\s+[\w./-]+\.(?:cc|cpp|h):\d+\] ")
_CPP_PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_NO_GPU_ERRORS = (b"failed call to cuInit", b"cuda_diagnostics", b"kernel driver does not appear")
# TensorFlow's own CPU-feature notice is printed without the absl prefix.
_PLAIN_NOTICES = (b"To enable the following instructions:", b"This TensorFlow binary is optimized")

_installed = False


def verbose_requested(argv=None, environ=None):
    """True when the user asked for every log line (env var or `--verbosity>=1`)."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_VERBOSE, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    argv = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--verbosity=") or arg.startswith("-v="):
            value = arg.split("=", 1)[1]
        elif arg in ("--verbosity", "-v") and i + 1 < len(argv):
            value = argv[i + 1]
        if value is not None:
            try:
                return int(value) >= 1
            except ValueError:
                return False
    return False


class LineFilter:
    """Decides, line by line, what of fd 2 reaches the user.

    A C++ log message can span lines (`\t [[{{node ...}}]]`): an indented
    line right after a hidden C++ line is hidden with it.

    Args:
        has_gpu_driver: bool. Whether an NVIDIA driver is present (the CUDA
            probe's errors are then real and kept).
    """

    def __init__(self, has_gpu_driver):
        self.has_gpu_driver = has_gpu_driver
        self._hid_cpp_line = False

    def keep(self, line):
        """Whether one stderr line (bytes, without its newline) reaches the user."""
        if self._hid_cpp_line and line[:1] in (b" ", b"\t"):
            return False
        self._hid_cpp_line = False
        stripped = line.strip()
        if stripped == _CPP_PREAMBLE or stripped.startswith(_PLAIN_NOTICES):
            return False
        match = _CPP_LINE.match(line)
        if not match:
            return True
        hide = match.group(1) in (b"I", b"W") or (
            not self.has_gpu_driver and any(marker in line for marker in _NO_GPU_ERRORS)
        )
        self._hid_cpp_line = hide
        return not hide


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _only_our_info(record):
    """Python log filter: INFO and below only from tftransfer's own modules.

    TensorFlow logs its saving chatter (`signature_serialization`, `Assets
    written to`, fingerprints) at INFO through the same `absl` logger the
    entrypoints use, so the level alone cannot tell them apart; the source
    file can. Warnings and errors from anywhere pass.
    """
    return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)


def _has_gpu_driver():
    return os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")


def install(argv=None):
    """Set up quiet logs for this process (idempotent). Call before TensorFlow loads.

    Args:
        argv: list of str. The command line to read `--verbosity` from.
            Defaults to `sys.argv[1:]`.
    """
    global _installed
    if _installed or verbose_requested(argv):
        return
    _installed = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    for name in ("absl", "tensorflow"):
        logging.getLogger(name).addFilter(_only_our_info)
    try:
        original = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:  # No usable fd 2 (rare embedded use): leave logs as they are.
        return
    line_filter = LineFilter(_has_gpu_driver())

    def forward():
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                out = b"".join(line + b"\n" for line in lines if line_filter.keep(line))
                if out:
                    os.write(original, out)
        if pending and line_filter.keep(pending):
            os.write(original, pending)

    thread = threading.Thread(target=forward, name="tftransfer-quiet-logs", daemon=True)
    thread.start()

    def drain():
        # Put the real stderr back (closing the pipe's last writer), then let
        # the forwarder pass on what is left, such as a final `error:` line.
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(original, 2)
        thread.join(timeout=5)

    atexit.register(drain)
