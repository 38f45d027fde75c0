"""How the daemon's parts reach its engine thread.

The model runs in a process of its own, driven from ONE thread of the daemon (a single-thread
executor), so that every call reaches it in the order it was made. Parts that run on the event
loop (`ModelSwap`, `AnswerPlayer`) are handed this pair instead of the executor and the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineThread:
    """`submit(fn, what, *args)` runs fn(*args) in the engine thread after everything submitted
    before and returns its Future (`what` names the job in logs); `on_loop(callback)` makes a
    Future callback that runs `callback` on the event loop (futures call back on the engine
    thread)."""

    submit: Callable[..., Future]
    on_loop: Callable[[Callable[[Future], None]], Callable[[Future], None]]
