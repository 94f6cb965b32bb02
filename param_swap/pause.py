"""Generation paused around a swap: pause (retract), flush the radix cache, continue; every step confirmed by
the scheduler's own thread (ServeGuard's hooks) and, with several hosts, by every rank's."""

from param_swap.errors import ExitCode, ToolError
from param_swap.hosts import HOSTS
from param_swap.sglang_adapter import ServeGuard
from param_swap.waits import TimedOut, wait_until_async

PAUSE_WAIT_S = 120.0  # how long a swap waits for the scheduler to confirm it paused
FLUSH_WAIT_S = 60.0  # rank >= 1: how long it waits for rank 0's flush to reach its scheduler


async def continue_generation(guard: ServeGuard) -> None:
    guard.release_waiting()  # rank >= 1: held since its pause (rank 0's flush is over or will not come)
    if HOSTS.rank == 0:  # rank 0's reaches every host's scheduler
        await guard.send_continue()


async def pause_generation(guard: ServeGuard, pauses: int, continue_on_failure: bool = True) -> int:
    """pause_generation(retract), then wait until the scheduler's own thread has handled it with nothing left
    running (the tokenizer manager's pause only sends the request). `pauses`: the guard's count before this
    pause. Returns the requests the scheduler holds. Rank >= 1 of several hosts: rank 0's pause reaches this
    host's scheduler (it forwards every request); wait for it, then hold its waiting requests aside for rank 0's
    flush to come. continue_on_failure=False: a resume's pause, of an engine whose memory is released."""
    if HOSTS.rank == 0:
        await guard.send_pause()
    try:
        await wait_until_async(lambda: guard.pauses != pauses and guard.paused_requests is not None, PAUSE_WAIT_S,
                               "the scheduler confirming the pause")
    except TimedOut:
        if continue_on_failure:
            await continue_generation(guard)
        error = ToolError("swap_pause", f"the scheduler did not confirm the pause within {PAUSE_WAIT_S:.0f} s"
                          + ("" if guard.pauses == pauses else " (requests were still running)"),
                          "nothing was swapped; generation continues", ExitCode.ENGINE)
        HOSTS.fail(error)
        raise error from None
    guard.paused(hold_waiting=HOSTS.rank > 0)  # rank 0's flush can reach this scheduler before flush_radix_cache
    return guard.paused_requests


def agree_paused(guard: ServeGuard, pauses: int) -> None:
    """Every rank's scheduler confirmed this swap's pause with nothing running (its own hook's record) before any
    rank touches a Param; else none does (generation continues), exit 3."""
    mine = {"pauses": guard.pauses - pauses, "running": guard.paused_requests is None}
    seen = HOSTS.agree("swap_paused", mine)
    late = [r for r, s in enumerate(seen) if s["pauses"] < 1 or s["running"]]
    if late:
        raise ToolError("swap_pause", f"rank(s) {late} had not paused generation when the swap was to start: "
                        + "; ".join(f"rank {r}: {s['pauses']} pause(s) handled, requests "
                                    f"{'still running' if s['running'] else 'paused'}" for r, s in enumerate(seen)),
                        "nothing was swapped (a forward there would mix weight sets); generation continues",
                        ExitCode.ENGINE, not_paused_ranks=late, failed_rank=late[0])


async def flush_radix_cache(guard: ServeGuard) -> int:
    """The scheduler's flush_cache with the waiting (retracted) requests held aside, on every rank (rank 0's
    reaches the others' schedulers), and proven: every rank's flush succeeded and left its radix cache empty
    (prefix KV of the old weights would survive a refused or skipped flush: an error, generation stays paused).
    Returns how many requests were held aside (rank 0's)."""
    flushes = guard.flushes_at_pause
    if HOSTS.rank == 0:
        await guard.send_flush()
    try:
        await wait_until_async(lambda: guard.flushes != flushes, FLUSH_WAIT_S, "the flush")
        mine = dict(guard.last_flush)
    except TimedOut:
        mine = {"success": False, "message": f"no flush arrived within {FLUSH_WAIT_S:.0f} s", "held": 0,
                "radix_tokens_after": None}
    guard.release_waiting()
    seen = HOSTS.agree("swap_flushed", mine)
    bad = [r for r, f in enumerate(seen) if not f["success"] or f["radix_tokens_after"]]
    if bad:
        why = {r: seen[r]["message"] or f"it succeeded, yet {seen[r]['radix_tokens_after']} tokens are still cached"
               for r in bad}
        raise ToolError("swap_flush", "the radix cache flush was refused or incomplete: " + (
            "; ".join(f"rank {r}: {w}" for r, w in why.items()) if HOSTS.multi else why[0]),
            "generation stays paused: the cache may hold prefix KV of the previous weights",
            ExitCode.ENGINE, generation="paused", flushes=seen, failed_rank=bad[0])
    return seen[0]["held"]
