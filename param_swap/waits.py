"""Bounded waits: every wait for another thread, process or host ends by a deadline."""

import asyncio
import time
from collections.abc import Callable, Iterator


class TimedOut(Exception):
    def __init__(self, what: str, timeout_s: float):
        super().__init__(f"{what} did not happen within {timeout_s:.0f} s")
        self.what, self.timeout_s = what, timeout_s


def pauses(timeout_s: float, what: str, poll_s: float, max_poll_s: float) -> Iterator[float]:
    """The pauses between two polls, doubling from poll_s to max_poll_s; TimedOut once timeout_s has passed."""
    deadline, pause = time.monotonic() + timeout_s, poll_s
    while time.monotonic() <= deadline:
        yield pause
        pause = min(2 * pause, max_poll_s)
    raise TimedOut(what, timeout_s)


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.002,
               max_poll_s: float = 0.1) -> None:
    """Poll ready() until it is true (it may raise to end the wait early); TimedOut after timeout_s."""
    for pause in pauses(timeout_s, what, poll_s, max_poll_s):
        if ready():
            return
        time.sleep(pause)


async def wait_until_async(ready: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.002,
                           max_poll_s: float = 0.002) -> None:
    """wait_until() in a coroutine: the event loop runs meanwhile."""
    for pause in pauses(timeout_s, what, poll_s, max_poll_s):
        if ready():
            return
        await asyncio.sleep(pause)
