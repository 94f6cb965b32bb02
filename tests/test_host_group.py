"""param_swap/hosts.py without JAX: a HostGroup on an in-memory key-value store stands in for the coordination
service, so the races a real two-host run hits 1 time in 5 (issue 41) are played out exactly, every time."""

import json
import threading
import time

import pytest

from param_swap import hosts
from param_swap.errors import ToolError

LOST_AFTER = 2.0


class Store:
    """The coordination service's key-value store, as HostGroup uses it."""

    def __init__(self):
        self.kv: dict[str, str] = {}
        self.lock = threading.Lock()
        self.gone = False

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        with self.lock:
            if self.gone:
                raise RuntimeError("UNAVAILABLE: recvmsg:Connection reset by peer")
            assert allow_overwrite or key not in self.kv, key
            self.kv[key] = value

    def key_value_dir_get(self, prefix: str) -> list[tuple[str, str]]:
        with self.lock:
            if self.gone:
                raise RuntimeError("UNAVAILABLE: recvmsg:Connection reset by peer")
            return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


class Other:
    """The other rank's heartbeat, beating (run()) until alive is False."""

    def __init__(self, store: Store, rank: int = 1, phase: str = "generate_before_swap"):
        self.store, self.rank, self.phase, self.count, self.alive = store, rank, phase, 0, True
        self.beat()

    def beat(self) -> None:
        self.count += 1
        self.store.key_value_set(f"{hosts.HostGroup.KEY}/alive/{self.rank}", json.dumps([self.count, self.phase]),
                                 allow_overwrite=True)

    def run(self) -> None:
        def loop():
            while self.alive:
                time.sleep(hosts.HEARTBEAT_S)
                if self.alive:
                    self.beat()

        threading.Thread(target=loop, daemon=True).start()


def this_rank(store: Store, watch: bool = True, rank: int = 0) -> hosts.HostGroup:
    owner = hosts.Hosts()
    failures: list[ToolError] = []
    owner.on_failure = failures.append
    owner.doing = lambda: "generate_before_swap"
    group = hosts.HostGroup(2, rank, timeout_s=30, lost_after=LOST_AFTER, owner=owner)
    group.client = store
    group.seen = {1 - rank: (None, time.monotonic(), "jax_ready")}
    group.failures = failures
    if watch:
        threading.Thread(target=group.watch, daemon=True).start()
    return group


def test_a_beat_written_before_the_failure_and_read_after_it_is_not_a_sign_of_life():
    """CI's hang: rank 1 beat, then was killed; rank 0's forward failed (SIGQUIT) and only then did its watcher
    read that last beat. lost_since() must still find rank 1 lost (it was taken as alive: an engine_crash line,
    then a 120 s wait for rank 1's verdict)."""
    store = Store()
    other = Other(store)
    group = this_rank(store, watch=False)
    group.silent(store.key_value_dir_get(f"{hosts.HostGroup.KEY}/alive/"))  # the watcher has seen beat 1
    other.beat()  # beat 2: written just before rank 1 dies ...
    threading.Timer(0.2, lambda: threading.Thread(target=group.watch, daemon=True).start()).start()
    t = time.monotonic()
    lost = group.lost_since()  # ... and read by the watcher 0.2 s after rank 0's failure
    assert lost is not None and lost.details["lost_ranks"] == [1], lost
    assert LOST_AFTER <= time.monotonic() - t <= LOST_AFTER + 3 * hosts.HEARTBEAT_S + 1


def test_a_living_rank_is_found_alive_at_once():
    store = Store()
    other = Other(store)
    other.run()
    group = this_rank(store)
    time.sleep(2 * hosts.HEARTBEAT_S)
    t = time.monotonic()
    assert group.lost_since() is None
    assert time.monotonic() - t < LOST_AFTER  # a beat or two, not the wait for a lost rank
    other.alive = False


def test_a_rank_lost_while_this_one_ends_is_not_waited_for():
    """This rank failed (its error published) and rank 1 dies then: the watcher, still reading heartbeats, names
    rank 1 lost within lost_after, and the end's agreement does not wait HOST_END_WAIT_S for its verdict."""
    store = Store()
    other = Other(store)
    other.run()
    group = this_rank(store)
    time.sleep(2 * hosts.HEARTBEAT_S)
    group.fail(ToolError("engine_crash", "the scheduler failed", exit_code=3))
    other.alive = False
    t = time.monotonic()
    code, ranks = group.end({"rank": 0, "exit_code": 3, "failed_checks": []})
    assert time.monotonic() - t <= LOST_AFTER + 4 * hosts.HEARTBEAT_S
    assert code == 3 and ranks[1]["lost"] and ranks[1]["exit_code"] is None, ranks
    assert not group.failures  # this rank was already ending: the watcher only recorded the loss


def test_a_failure_published_without_the_coordination_service_does_not_raise():
    store = Store()
    Other(store)
    group = this_rank(store, watch=False)
    store.gone = True
    group.fail(ToolError("hosts", "rank 0 gone", exit_code=3))  # a log line, not an exception in the Stopper
    assert group.handled.is_set()


@pytest.mark.parametrize("unreachable", [False, True])
def test_a_silent_rank_is_named_with_its_phase(unreachable):
    """No heartbeat (rank 1 gone), or no coordination service (rank 0's process gone, seen from rank 1): the
    error names the rank, the phase it was last in, this rank's phase, and lost_after."""
    store = Store()
    who = 0 if unreachable else 1
    Other(store, who)
    group = this_rank(store, rank=1 - who)
    time.sleep(2 * hosts.HEARTBEAT_S)
    store.gone = unreachable
    deadline = time.monotonic() + LOST_AFTER + 4 * hosts.HEARTBEAT_S
    while not group.failures and time.monotonic() < deadline:
        time.sleep(0.05)
    lost = group.failures[0]
    assert lost.stage == "hosts" and lost.details["lost_ranks"] == [who] and lost.exit_code == 3
    assert lost.error.startswith(f"rank(s) {who} (in generate_before_swap) stopped answering") and f"for {LOST_AFTER:.0f} s" in lost.error
    assert lost.error.endswith("while this rank was in generate_before_swap"), lost.error


@pytest.mark.parametrize("dead", [False, True])
def test_an_engine_failure_is_explained_by_a_lost_rank(dead):
    """Hosts.explain: a failure with exit 3 (a forward's collective failed) becomes the lost rank's line, with
    the failure as engine_error and its details kept; with every rank alive it stays as it was. From then on
    this rank is ending: the watcher's own verdict does not end it a second time."""
    store = Store()
    other = Other(store)
    other.run()
    owner = hosts.Hosts()
    group = this_rank(store)
    owner.group, group.owner = group, owner
    owner.on_failure, owner.doing = group.failures.append, lambda: "generate_before_swap"
    time.sleep(2 * hosts.HEARTBEAT_S)
    other.alive = not dead
    failure = ToolError("swap", "gloo: Connection closed by peer", exit_code=3, restored=True)
    explained = owner.explain(failure, None, "weights_swapped_from_mllm")
    if dead:
        assert explained.stage == "hosts" and explained.details["lost_ranks"] == [1], explained.record()
        assert explained.details["engine_error"] == failure.error and explained.details["restored"] is True
        assert explained.details["interrupted_phase"] == "weights_swapped_from_mllm"
    else:
        assert explained is failure
        other.alive = False
    time.sleep(LOST_AFTER + 4 * hosts.HEARTBEAT_S)
    assert not group.failures


def test_one_host_explains_nothing_and_waits_for_nothing():
    failure = ToolError("engine_crash", "the scheduler failed", exit_code=3)
    t = time.monotonic()
    assert hosts.Hosts().explain(failure, None, "generate_before_swap") is failure
    assert time.monotonic() - t < 0.01
