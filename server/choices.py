"""The n choices of one request as one stream of (choice index, output), in arrival order.

Each choice is its own engine request (the engine shares their prompt's KV). Closing the
merged stream, or one choice failing, closes every choice's stream, which aborts whatever is
still running in the engine.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import suppress

from engine.output_processor import RequestOutput

_END = object()


async def merge_choices(streams: list[AsyncIterator[RequestOutput]]
                        ) -> AsyncIterator[tuple[int, RequestOutput]]:
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((index, out))
            await queue.put((index, _END))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((index, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            index, item = await queue.get()
            if item is _END:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with suppress(asyncio.CancelledError):
                await task
        for stream in streams:
            await stream.aclose()  # a no-op for finished ones; aborts the rest
