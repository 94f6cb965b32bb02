"""Stopping: Ctrl-C (SIGINT) and SIGTERM (`timeout`, schedulers) end the run with its verdict; the engine's
own failure signal (SIGQUIT) is exit 3 with one error line."""

import os
import signal
import sys
import threading
import time

from param_swap import phases
from param_swap import sglang_adapter as adapter
from param_swap.errors import ExitCode, ToolError, dump_threads, log
from param_swap.hosts import ENDING_S, HOSTS
from param_swap.phases import PhaseLog
from param_swap.swapper import ParamSwapper

STOP_SIGNALS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # the shell's 128 + signal number


# sglang-jax's scheduler answers its own failure (an exception, a watchdog timeout) with SIGQUIT, and its
# handler SIGKILLs the whole process tree: exit 137, no message. The Stopper takes SIGQUIT too: exit 3.
WATCHED_SIGNALS = {*STOP_SIGNALS, signal.SIGQUIT}


SWAP_FINISH_WAIT_S = 120.0  # how long a stop waits for a swap in progress to complete or roll back


class Stopper:
    """Takes SIGINT, SIGTERM and the engine's SIGQUIT on one sigwait thread (the entry blocks them in every
    thread first: param_swap.block_stop_signals), so a stop is seen whatever the main thread is doing and no
    handler runs half-way through a swap. It lets a swap in progress finish or roll back (at most
    SWAP_FINISH_WAIT_S), then writes one error line, the summary and the table, and exits 130 / 143 (SIGQUIT: 3)."""

    def __init__(self, phase_log: PhaseLog, cfg):
        self.phases, self.cfg = phase_log, cfg
        self.swapper: ParamSwapper | None = None  # set once the engine runs
        self.cleanup: list = []  # callables run before exiting (the demo's temp folder)
        self.stopping = threading.Lock()  # held by the one stop() that ends the process

    def install(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED_SIGNALS)
        threading.Thread(target=self.watch, name="param-swap-stopper", daemon=True).start()

    def engine_holds(self, waited: float | None) -> str:
        sw = self.swapper
        if sw is None:
            return "no engine was running" if self.phases.doing != "engine_ready_dummy" else "the engine was starting"
        if not sw.idle.is_set():
            return f"a swap was still running after {waited:.0f} s: the engine is half-swapped"
        if sw.released is not None:
            return "nothing: its memory was released for a trainer's step (" + ", ".join(
                what for what, gone in (("weights", sw.released.weights), ("KV cache", sw.released.kv)) if gone) + ")"
        if sw.last_swap_restored is not None:
            return ("the previous weights (a failed swap was rolled back)" if sw.last_swap_restored
                    else "half-swapped weights (a failed swap without rollback)")
        swapped = f"the weights of swap {sw.swaps}" if sw.swaps else "the dummy weights (no swap yet)"
        return swapped + (f"; the swap in progress completed before stopping ({waited:.1f} s)" if waited else "")

    def watch(self) -> None:
        signum = signal.sigwait(WATCHED_SIGNALS)
        name, doing = signal.Signals(signum).name, self.phases.doing
        log(f"{name}: stopping (during {doing})")
        if signum == signal.SIGQUIT:
            engine_error = adapter.ENGINE_ERRORS.text()
            self.stop(HOSTS.explain(ToolError(  # several hosts: a forward fails when another rank dies
                "engine_start" if doing == "engine_ready_dummy" else "engine_crash",
                "the sglang-jax scheduler failed (SIGQUIT: a scheduler exception or a watchdog timeout)"
                + (f": {engine_error}" if engine_error else ""),
                "see stderr for the scheduler's traceback; raise --watchdog-timeout if compiles are slow",
                ExitCode.ENGINE, interrupted_phase=doing, signal=name), engine_error or None, doing))
        waited = None
        if self.swapper is not None and not self.swapper.idle.is_set():
            t = time.perf_counter()
            self.swapper.idle.wait(SWAP_FINISH_WAIT_S)
            waited = time.perf_counter() - t
        self.stop(ToolError("interrupted", f"{name} during {doing}", "the run was stopped; rerun to get a verdict",
                            STOP_SIGNALS[signum], signal=name, interrupted_phase=doing,
                            engine_holds=self.engine_holds(waited)))

    def exit_by(self, deadline_s: float = ENDING_S) -> None:
        """Several hosts: the process exits within deadline_s of its verdict whatever it waits for (the end's
        agreement and jax.distributed.shutdown have their own bounds; this is the last one): past it, every
        thread's stack on stderr (where it waits) and exit with the verdict's code (3 if none was written)."""
        def abandon():
            try:
                dump_threads(f"the run's end still waits after {deadline_s:.0f} s (during {self.phases.doing}): "
                             "exiting")
                adapter.kill_engine_children()
            finally:
                os._exit(self.phases.code if self.phases.code is not None else ExitCode.ENGINE)

        if HOSTS.multi:
            timer = threading.Timer(deadline_s, abandon)
            timer.daemon = True
            timer.start()

    def stop(self, error: ToolError) -> None:
        """The run's end (finish: unless the run already wrote its verdict), then exit at once. Once: a second
        caller (the hosts' watcher and a signal at the same time) waits for the first one's exit."""
        if not self.stopping.acquire(blocking=False):
            threading.Event().wait()
        code = ExitCode.ENGINE
        try:
            code = phases.finish(self.phases, self.cfg, error)
            for f in self.cleanup:
                f()
            sys.stdout.flush()
            sys.stderr.flush()
            adapter.kill_engine_children()
            HOSTS.shutdown()
        finally:  # whatever failed while ending, the process ends (a second stop() waits for this exit)
            os._exit(code)
