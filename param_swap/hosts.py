"""Several hosts (--nnodes: one process per host of a pod slice, JAX multi-controller): every collective step of
a run is agreed on by every rank, a failure anywhere ends every rank alike, a rank that dies is named. One host
(the default) pays nothing: every step returns at once and no thread runs (HOSTS until HOSTS.start(...))."""

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from param_swap.errors import ExitCode, ToolError, dump_threads, log
from param_swap.waits import TimedOut, wait_until

HEARTBEAT_S = 0.5  # how often every rank says it is alive, and looks at the others'
DEFAULT_HOST_LOST_S = 15.0  # --host-lost-after: a rank silent this long is gone, well before JAX's own heartbeat
HOST_END_WAIT_S = 120.0  # how long a finished rank waits for the others' verdicts before exiting alone
SHUTDOWN_S = 60  # jax.distributed.shutdown's own bound (its barrier)
ENDING_S = HOST_END_WAIT_S + SHUTDOWN_S + 30  # from the verdict to the exit, whatever waits: then the thread dump
HOST_ERROR_GRACE_S = 10.0  # how long a rank's main thread has to notice another rank's failure itself
LOST_HINT = ("the host died (OOM-killed, preempted, kill -9) or hangs: see its log and `dmesg` there; the other "
             "ranks exited (3) without waiting for it; --host-lost-after sets how long a rank may be silent")


class Hosts:
    """This process among the hosts of a run: one host until start() joins several (then a HostGroup does every
    step). The API in a multi-host RL loop: HOSTS.start(nnodes, rank, "HOST:PORT", timeout_s, platform) before
    anything else touches JAX, then start_engine(...) and ParamSwapper as on one host (docs/api.md)."""

    def __init__(self):
        self.group: HostGroup | None = None
        self.on_failure: Callable[[ToolError], None] | None = None  # another rank failed while this one was busy
        self.doing: Callable[[], str] = lambda: ""  # this rank's phase in progress, sent with its heartbeat

    @property
    def multi(self) -> bool:
        return self.group is not None

    @property
    def rank(self) -> int:
        return self.group.rank if self.group else 0

    @property
    def nnodes(self) -> int:
        return self.group.nnodes if self.group else 1

    def start(self, nnodes: int, rank: int, addr: str | None, timeout_s: float, platform: str,
              lost_after: float = DEFAULT_HOST_LOST_S) -> None:
        """Several hosts: jax.distributed.initialize (before anything else touches JAX), then the heartbeat and
        the watcher. One host: nothing."""
        if nnodes > 1:
            self.group = HostGroup(nnodes, rank, timeout_s, lost_after, self)
            self.group.join(addr, platform)

    def agree(self, name: str, value: Any = None) -> list:
        """Every rank's `value` (JSON) at this step, in rank order: a barrier on several hosts."""
        return self.group.agree(name, value) if self.group else [value]

    def from_rank0(self, name: str, value: Any = None) -> Any:
        """Rank 0's `value` on every rank (e.g. its generation's answer)."""
        return self.agree(name, value if self.rank == 0 else None)[0]

    def fail(self, error: ToolError) -> None:
        """Publish this rank's failure so that every rank ends with it."""
        if self.group:
            self.group.fail(error)

    def lost_since(self) -> ToolError | None:
        """After a failure a lost rank can cause: the lost rank's error, or None (see HostGroup.lost_since)."""
        return self.group.lost_since() if self.group else None

    def explain(self, error: ToolError, engine_error: str | None, doing: str) -> ToolError:
        """An engine failure (exit 3) on several hosts: the lost rank's error if a rank is lost (a collective
        fails here when another rank dies), with this failure as `engine_error` (and its details: what a swap
        restored); else the failure itself. This rank is ending from here: the watcher's verdicts stand aside."""
        if self.group is None or error.stage == "hosts" or error.exit_code != ExitCode.ENGINE:
            return error
        self.group.handled.set()
        lost = self.lost_since()
        if lost is None:
            return error
        return ToolError(lost.stage, lost.error, lost.hint, lost.exit_code, **{
            **error.details, **lost.details, "engine_error": engine_error or error.error, "interrupted_phase": doing})

    def end(self, code: int, failed_checks: list[str]) -> tuple[int, list[dict]]:
        """The last step: the common exit code and every rank's {rank, exit_code, failed_checks}."""
        mine = {"rank": self.rank, "exit_code": code, "failed_checks": failed_checks}
        return self.group.end(mine) if self.group else (code, [mine])

    def shutdown(self) -> None:
        """Several hosts: leave together (jax.distributed.shutdown)."""
        if self.group:
            self.group.shutdown()


class HostGroup:
    """The ranks of a multi-host run: every step is a bounded round on the coordination service's key-value store,
    never a device collective, so it cannot interleave with a forward and deadlock. A failure on any rank, or a
    rank silent for lost_after seconds, ends every rank with one error line (exit 3), before JAX's own abort."""

    KEY = "run_param_swap"

    def __init__(self, nnodes: int, rank: int, timeout_s: float, lost_after: float, owner: Hosts):
        self.nnodes, self.rank, self.timeout_s, self.lost_after, self.owner = nnodes, rank, timeout_s, lost_after, owner
        self.client = None  # the coordination service's, once joined
        self.step = 0
        self.handled = threading.Event()  # this rank has turned a failure into its error line (or is ending)
        self.lost: ToolError | None = None  # set by the watcher: a rank (or the coordination service) is gone
        self.seen: dict[int, tuple[Any, float, str]] = {}  # rank -> (its last beat, when it changed, its phase)

    def join(self, addr: str, platform: str) -> None:
        """jax.distributed.initialize, bounded, then the heartbeat and the watcher threads."""
        import jax
        from jax._src import distributed

        nnodes, rank = self.nnodes, self.rank
        if platform == "cpu":  # cross-process collectives of CPU devices
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        host = addr.rsplit(":", 1)[0]
        bind = addr if host in ("127.0.0.1", "localhost", "::1") else None  # else JAX binds every interface
        wait = int(min(self.timeout_s, 300))
        hint = ("start the same command on every host within the timeout (min(--watchdog-timeout, 300 s)), with "
                "the same --dist-init-addr: rank 0's address and a free port")
        # JAX ends the process with a fatal log (no Python exception) when a host does not join in time: say it first
        late = threading.Timer(max(1.0, wait - 2.0), lambda: self.on_failure(ToolError(
            "hosts", f"not every one of the {nnodes} hosts joined {addr} within {wait} s", hint, ExitCode.ENGINE)))
        late.daemon = True
        late.start()
        try:
            jax.distributed.initialize(addr, nnodes, rank, initialization_timeout=wait,
                                       coordinator_bind_address=bind, shutdown_timeout_seconds=SHUTDOWN_S)
        except Exception as e:  # noqa: BLE001 - JAX's errors (a port in use, a bad address) become one error line
            raise ToolError("hosts", f"jax.distributed.initialize({addr}, {nnodes}, {rank}) failed: "
                            f"{type(e).__name__}: {str(e).splitlines()[0]}", hint, ExitCode.ENGINE) from e
        finally:
            late.cancel()
        self.client = distributed.global_state.client
        now = time.monotonic()
        self.seen = {r: (None, now, "jax_ready") for r in range(nnodes) if r != rank}
        threading.Thread(target=self.beat, name="param-swap-heartbeat", daemon=True).start()
        threading.Thread(target=self.watch, name="param-swap-hosts", daemon=True).start()

    def on_failure(self, error: ToolError) -> None:
        if self.owner.on_failure is not None:
            self.owner.on_failure(error)

    def agree(self, name: str, value: Any) -> list:
        """Every rank's `value` at this step. Raises the first failure another rank published, a ToolError when a
        rank does not come within timeout_s, or when the ranks are at different steps (they run different code)."""
        self.step += 1
        key = f"{self.KEY}/{self.step}/"
        self.client.key_value_set(key + str(self.rank), json.dumps({"name": name, "value": value}, default=str))
        got = self.gather(key, self.timeout_s, name)
        names = {r: v["name"] for r, v in got.items()}
        if len(set(names.values())) > 1:
            raise ToolError("hosts", f"the ranks are at different steps: {names}",
                            "every host must run the same command (same flags and checkpoint)", ExitCode.ENGINE)
        return [got[r]["value"] for r in range(self.nnodes)]

    def gather(self, key: str, timeout_s: float, name: str, errors: bool = True) -> dict[int, Any]:
        """Every rank's value under `key` (errors=False: every rank's that is not lost). A long wait (another rank
        generating) polls the coordinator gently."""
        got: dict[int, Any] = {}

        def complete() -> bool:
            got.clear()
            got.update({int(k.rsplit("/", 1)[1]): json.loads(v) for k, v in self.kv_dir(key, name)})
            gone = set(self.lost.details["lost_ranks"]) if self.lost is not None and not errors else set()
            if len(set(got) | gone) == self.nnodes:
                return True
            if errors and self.lost is not None:
                raise self.lost
            if errors and (failure := self.failure()):
                raise failure
            return False

        try:
            wait_until(complete, timeout_s, name)
        except TimedOut as e:
            missing = sorted(set(range(self.nnodes)) - set(got))
            doing = self.owner.doing()
            dump_threads(f"rank(s) {missing} did not reach '{name}'")
            raise ToolError("hosts", f"rank(s) {missing} did not reach '{name}' within {timeout_s:.0f} s"
                            + (f", while this rank was in {doing}" if doing else ""),
                            "a host is stuck or gone: see its log and its thread dump on stderr (--watchdog-timeout "
                            "bounds each wait)", ExitCode.ENGINE, missing_ranks=missing, waiting_at=name) from e
        return got

    def fail(self, error: ToolError) -> None:
        """Publish this rank's failure (not one it learnt from another rank)."""
        self.handled.set()
        if self.client is not None and error.details.get("failed_rank", self.rank) == self.rank:
            record = {**error.record(), "failed_rank": self.rank}
            try:
                self.client.key_value_set(f"{self.KEY}/error/{self.rank}", json.dumps(record, default=str),
                                          allow_overwrite=True)
            except Exception as e:  # noqa: BLE001 - the coordination service is gone: this rank's error line says it
                log(f"could not publish this rank's failure: {type(e).__name__}: {str(e).splitlines()[0]}")

    def kv_dir(self, key: str, name: str) -> list:
        """The key-value store's entries under `key`; the coordination service gone (rank 0's process died):
        the error line that says so, not JAX's exception."""
        try:
            return self.client.key_value_dir_get(key)
        except Exception as e:  # noqa: BLE001 - JAX's RPC errors (UNAVAILABLE, ...) become one error line
            raise self.lost or ToolError("hosts", f"the coordination service (rank 0) is unreachable at '{name}': "
                                         f"{type(e).__name__}: {str(e).splitlines()[0]}", LOST_HINT, ExitCode.ENGINE,
                                         lost_ranks=[0], failed_rank=0) from e

    def failure(self) -> ToolError | None:
        """The lowest rank's published failure, as this rank's error (same stage, exit code), or None."""
        found = sorted((int(k.rsplit("/", 1)[1]), json.loads(v)) for k, v in self.kv_dir(f"{self.KEY}/error/", "error"))
        if not found:
            return None
        return ToolError.of_rank(*found[0])

    def beat(self) -> None:
        """This rank's heartbeat until the process exits (also while it ends: a rank that finished first must not
        look lost to one still finishing), with the phase it is in."""
        count = 0
        while True:
            count += 1
            try:
                self.client.key_value_set(f"{self.KEY}/alive/{self.rank}", json.dumps([count, self.owner.doing()]),
                                          allow_overwrite=True)
            except Exception:  # noqa: BLE001 - the coordination service is gone: the watcher says so
                return
            time.sleep(HEARTBEAT_S)

    def watch(self) -> None:
        """The other ranks' heartbeats and published failures, until the process exits (a rank that dies while
        this one ends must be known as lost, not waited for). Ends this rank when another rank failed and the main
        thread does not notice (it is inside the engine's start, a generation, a checkpoint read): within
        HOST_ERROR_GRACE_S; when a rank is lost (no heartbeat for lost_after s, or the coordination service
        unreachable as long): at once (the main thread's step raises it). Once this rank is ending (handled), it
        only records who is lost."""
        reachable, reported = time.monotonic(), False
        while True:
            try:
                lost = self.silent(self.kv_dir(f"{self.KEY}/alive/", "heartbeat"))
                failure = None if reported or self.handled.is_set() else self.failure()
                reachable = time.monotonic()
            except ToolError:  # the coordination service (rank 0's process) is gone
                failure = None
                silent_s = time.monotonic() - reachable
                lost = (self.lost_error([0], f"the coordination service it runs has not answered for "
                                             f"{self.lost_after:.0f} s") if silent_s > self.lost_after else None)
            if lost is not None and (self.lost is None or
                                     set(lost.details["lost_ranks"]) - set(self.lost.details["lost_ranks"])):
                first, self.lost = self.lost is None, lost  # more ranks lost later: named too (the end waits for none)
                if first:
                    self.fail_after(lost, 2 * HEARTBEAT_S)
            if failure is not None and failure.details["failed_rank"] != self.rank:
                reported = True
                self.fail_after(failure, HOST_ERROR_GRACE_S)
            time.sleep(HEARTBEAT_S)

    def fail_after(self, error: ToolError, grace_s: float) -> None:
        """End this rank with `error` unless it is ending by itself (handled) within grace_s."""
        def later():
            if not self.handled.wait(grace_s):
                self.on_failure(error)

        threading.Thread(target=later, name="param-swap-host-failure", daemon=True).start()

    def beats(self) -> dict[int, int] | None:
        """Every rank's heartbeat count as stored now; None if the coordination service does not answer."""
        try:
            return {int(k.rsplit("/", 1)[1]): json.loads(v)[0] for k, v in self.kv_dir(f"{self.KEY}/alive/", "beats")}
        except ToolError:
            return None

    def silent(self, beats: list) -> ToolError | None:
        """The error naming the ranks whose heartbeat has not changed for lost_after seconds, or None."""
        now = time.monotonic()
        for k, v in beats:
            r, (count, phase) = int(k.rsplit("/", 1)[1]), json.loads(v)
            if r in self.seen and self.seen[r][0] != count:
                self.seen[r] = (count, now, phase)
        gone = sorted(r for r, (_, when, _) in self.seen.items() if now - when > self.lost_after)
        return self.lost_error(gone, f"no heartbeat for {self.lost_after:.0f} s") if gone else None

    def lost_error(self, gone: list[int], why: str) -> ToolError:
        """The error naming the lost ranks, the phase each was last in, and this rank's phase."""
        phases = {r: self.seen[r][2] if r in self.seen else "" for r in gone}
        doing = self.owner.doing()
        here = f", while this rank was in {doing}" if doing else ""
        return ToolError("hosts", "rank(s) " + ", ".join(f"{r}" + (f" (in {phases[r]})" if phases[r] else "")
                                                         for r in gone)
                         + f" stopped answering: {why}{here}", LOST_HINT, ExitCode.ENGINE, lost_ranks=gone,
                         lost_in_phase=phases, failed_rank=gone[0])

    def lost_since(self) -> ToolError | None:
        """After a failure here that a lost rank can cause (a forward's collective failed: the scheduler's
        SIGQUIT): the lost rank's error, or None once every other rank has beaten since now (a count above the one
        stored now: a beat read later may have been written before the failure). Waits at most lost_after and a
        few heartbeats."""
        if self.client is None:
            return None
        stored = self.beats()
        others = [r for r in range(self.nnodes) if r != self.rank]

        def settled() -> bool:
            if self.lost is not None:
                return True
            return stored is not None and all(self.seen[r][0] is not None and self.seen[r][0] > stored.get(r, -1)
                                              for r in others)

        try:
            wait_until(settled, self.lost_after + 4 * HEARTBEAT_S, "a heartbeat from every rank", HEARTBEAT_S / 2,
                       HEARTBEAT_S / 2)
        except TimedOut:  # the watcher's own verdict can be a poll late: silent since the failure is lost
            quiet = [r for r in others if stored is not None and (self.seen[r][0] or -1) <= stored.get(r, -1)]
            if self.lost is None and quiet:
                self.lost = self.lost_error(quiet, f"no heartbeat for {self.lost_after:.0f} s")
        return self.lost

    def end(self, mine: dict) -> tuple[int, list[dict]]:
        """Every rank's exit code and failed checks; the common exit code (an error's, else 1 if any check failed
        anywhere, else 0). A rank that does not come within HOST_END_WAIT_S is named."""
        if self.client is None:  # the hosts never connected
            return mine["exit_code"], [mine]
        self.handled.set()
        key = f"{self.KEY}/end/"
        try:
            self.client.key_value_set(key + str(self.rank), json.dumps(mine))
            got = self.gather(key, HOST_END_WAIT_S, "end", errors=False)
        except Exception:  # noqa: BLE001 - a rank missing (ToolError), or the coordination service gone: ours only
            got = {self.rank: mine}
        hosts = [got.get(r) or {"rank": r, "exit_code": None, "failed_checks": None, "lost": True}
                 for r in range(self.nnodes)]
        if len(got) < self.nnodes:
            return max(mine["exit_code"], ExitCode.ENGINE), hosts
        codes = [h["exit_code"] for h in hosts]
        errors = [c for c in codes if c not in (ExitCode.OK, ExitCode.CHECK_FAILED)]
        return (errors[0] if errors else max(codes)), hosts

    def shutdown(self) -> None:
        """jax.distributed.shutdown (every rank leaves together: one that just exits makes JAX abort the others);
        not with a rank lost (its barrier would wait for it: 60 s)."""
        if self.client is not None and self.lost is None:
            import jax

            try:
                jax.distributed.shutdown()
            except Exception as e:  # noqa: BLE001 - exiting anyway; said, not hidden
                log(f"jax.distributed.shutdown: {type(e).__name__}: {e}")


HOSTS = Hosts()  # this process's: one host until HOSTS.start(...) (start_jax, from --nnodes)
