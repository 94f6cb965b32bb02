"""The failures a run can explain: ToolError (a stage, a message, a hint, an exit code), the exit codes, the log."""

import enum
import faulthandler
import sys


class ExitCode(enum.IntEnum):
    OK = 0  # every check passed
    CHECK_FAILED = 1  # a verification check failed
    BAD_INPUT = 2  # bad input or usage, found before the engine is touched
    ENGINE = 3  # the engine failed (start, generate, the swap itself), or a host was lost


EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_ENGINE = ExitCode  # the names the API has always had


def log(msg: str) -> None:
    """A line for people on stderr (stdout carries the phase JSON only)."""
    print(f"[run_param_swap] {msg}", file=sys.stderr, flush=True)


def dump_threads(why: str) -> None:
    """`why`, then every thread's stack on stderr (where a wait past its bound waits); a stderr without a file
    descriptor (a notebook) gets the line only."""
    log(f"{why}: every thread's stack follows")
    try:
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        log("(no thread dump: stderr has no file descriptor)")


class ToolError(Exception):
    """A failure we can explain: one JSON error line, then the summary, then `exit_code`."""

    def __init__(self, stage: str, error: str, hint: str = "", exit_code: int = ExitCode.BAD_INPUT, **details):
        super().__init__(error)
        self.stage, self.error, self.hint, self.exit_code, self.details = stage, error, hint, int(exit_code), details

    def record(self) -> dict:
        return {"phase": "error", "stage": self.stage, "error": self.error, "hint": self.hint,
                "exit_code": self.exit_code, **self.details}

    @classmethod
    def of_rank(cls, rank: int, record: dict) -> "ToolError":
        """Another rank's error (its record()) as this rank's: the same stage, exit code and details."""
        details = {k: v for k, v in record.items() if k not in ("phase", "stage", "error", "hint", "exit_code")}
        return cls(record["stage"], f"rank {rank}: {record['error']}", record["hint"], record["exit_code"],
                   **{**details, "failed_rank": rank})
