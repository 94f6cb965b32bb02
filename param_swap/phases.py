"""The phase log (one strict JSON line per phase, the checks) and the verdict: the summary and how every run
ends, whatever ends it."""

import json
import math
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from param_swap import memory, report
from param_swap.errors import ExitCode, ToolError, log
from param_swap.generation import Answer
from param_swap.hosts import HOSTS


def strict_json(record: dict) -> str:
    """One line of strict JSON (RFC 8259: no NaN or Infinity tokens, which json.dumps writes by default and
    strict parsers refuse): a non-finite float becomes null, and the record names each such field and what it
    was (nonfinite_fields, e.g. {"logits.max_abs_logprob_diff": "nan"})."""
    found: dict[str, str] = {}

    def clean(value, where: str):
        if isinstance(value, (float, np.floating)):
            if math.isfinite(value):
                return float(value)
            found[where] = str(float(value))
            return None
        if isinstance(value, Mapping):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(record, "")
    if found:
        out["nonfinite_fields"] = found
    return json.dumps(out, default=str, allow_nan=False)


class PhaseLog:
    """Prints one JSON line per phase on stdout and in --json-out (strict JSON); keeps them for the summary.
    `measure(own)`: a phase's `memory` (its own sample, or one taken now: memory.phase_memory)."""

    def __init__(self, json_out: str | None, measure: Callable[[dict | None], dict] = memory.phase_memory):
        self.t0 = time.perf_counter()
        self.measure = measure
        self.records: list[dict] = []
        self.checks: dict[str, dict] = {}
        self.answers: list[tuple[str, Answer]] = []  # (phase, its answer) of every generation
        self.file = open(json_out, "w") if json_out else None
        self.sinks: list = []  # e.g. WandbSink: each gets every record
        self.doing = "start"  # the phase in progress (begin()), named if a signal stops the run
        self.lock = threading.RLock()  # the Stopper's lines never interleave with a phase's
        self.closed = False  # set by finish(): the run is over, nothing more is written
        self.code: int | None = None  # the verdict's exit code, once finish() wrote it
        self.stopper = None  # the Stopper: main() sets it

    def begin(self, name: str) -> None:
        self.doing = name

    def write(self, record: dict) -> dict:
        with self.lock:
            if not self.closed:
                self.emit(record)
        return record

    def emit(self, record: dict) -> None:
        line = strict_json(record)
        if HOSTS.rank == 0:
            print(line, flush=True)
        else:  # rank 0 prints the phase JSON of a multi-host run; the others a short log (and --json-out)
            log(f"rank {HOSTS.rank}: {record['phase']}" + (f" ({record['stage']}: {record['error']})"
                                                          if record["phase"] == "error" else ""))
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        self.records.append(record)
        for sink in self.sinks:
            sink.log(record)

    def phase(self, name: str, sample_memory: bool = True, **fields) -> dict:
        """One phase line; sample_memory: with its `memory` (a swap's report carries its own)."""
        record = {"phase": name, "elapsed_s": round(time.perf_counter() - self.t0, 3), **fields}
        if sample_memory:
            record["memory"] = self.measure(record.get("memory"))
        return self.write(record)

    def check(self, name: str, ok: bool, **details) -> bool:
        self.checks[name] = {"ok": bool(ok), **details}
        log(f"check {name}: {'ok' if ok else 'FAILED'}")
        return bool(ok)

    def memory_of(self, phase: str) -> int | None:
        for r in self.records:
            if r["phase"] == phase and "memory" in r:
                return memory.bytes_in_use_sum(r["memory"])
        return None


def summary(phases: PhaseLog, error: ToolError | None = None) -> int:
    """The verdict and the exit code. Several hosts: the same on every rank (Hosts.end), with each rank's."""
    if error is not None:
        HOSTS.fail(error)
    ok = error is None and bool(phases.checks) and all(c["ok"] for c in phases.checks.values())
    code = error.exit_code if error is not None else ExitCode.OK if ok else ExitCode.CHECK_FAILED
    code, hosts = HOSTS.end(code, [name for name, c in phases.checks.items() if not c["ok"]])
    for h in hosts:  # several hosts: a check that failed on another rank fails this one's verdict too
        if h["rank"] != HOSTS.rank and h["failed_checks"]:
            log(f"rank {h['rank']}: check(s) failed there: {', '.join(h['failed_checks'])}")
    phases.phase("summary", sample_memory=False, ok=code == ExitCode.OK, checks=phases.checks,
               **({"exit_code": code, "hosts": hosts} if HOSTS.multi else {}))
    return code


def finish(phases: PhaseLog, cfg, error: ToolError | None = None) -> int:
    """How every run ends, whatever ends it (main, a failure, the Stopper): the error line if any, the summary
    with the exit code, then the stderr table and the plot. Nothing is written after it (a stop that comes
    later finds the verdict written)."""
    with phases.lock:
        if phases.closed:  # a second ending (the Stopper's and main's): the verdict is written
            return phases.code
        if phases.stopper is not None:
            phases.stopper.exit_by()
        if error is not None:
            phases.write(error.record())
        code = phases.code = summary(phases, error)
        phases.closed = True
    report.report(phases.records, cfg)
    return code
