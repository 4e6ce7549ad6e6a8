"""AsyncLLM on the tiny model: streams, refusals, aborts, engine death, drain, idle loop."""

import asyncio
import resource
import time

import pytest

from engine import CapacityExceeded, EngineDead, InvalidRequest, LLMEngine, ModelLoadError
from engine.async_engine import AsyncLLM
from scheduler import SamplingParams
from tests.server.conftest import tiny_engine_config
from tests.server.helpers import SlowEngine

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


async def _started(config, **kwargs) -> AsyncLLM:
    engine = AsyncLLM(config, **kwargs)
    engine.start()
    await engine.wait_loaded(timeout=60)
    return engine


async def _wait_idle(engine: AsyncLLM, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats.num_running or engine.stats.num_waiting or engine.stats.kv_cache_usage:
        assert time.monotonic() < deadline, f"engine not idle: {engine.stats}"
        await asyncio.sleep(0.01)


def test_generate_streams_until_finished(tiny_model_dir):
    async def main():
        engine = await _started(tiny_engine_config(tiny_model_dir))
        outs = [o async for o in engine.generate([5, 6, 7], GREEDY, "a")]
        await engine.stop()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "length"
    assert not any(o.finished for o in outs[:-1])
    assert len(outs[-1].token_ids) == 8
    assert sum(len(o.delta_token_ids) for o in outs) == 8
    assert outs[-1].first_scheduled_time >= outs[-1].arrival_time


def test_concurrent_greedy_equals_sequential(tiny_model_dir):
    prompts = [[5 + i, 9, 11 + i] for i in range(6)]

    async def main():
        engine = await _started(tiny_engine_config(tiny_model_dir))

        async def run(i):
            return [o async for o in engine.generate(prompts[i], GREEDY, f"r{i}")][-1].token_ids

        sequential = [await run(i) for i in range(len(prompts))]
        concurrent = await asyncio.gather(*(run(i) for i in range(len(prompts))))
        await engine.stop()
        return sequential, concurrent

    sequential, concurrent = asyncio.run(main())
    assert concurrent == sequential


def test_add_request_errors_surface(tiny_model_dir):
    async def main():
        engine = await _started(tiny_engine_config(tiny_model_dir, max_num_seqs=1, max_waiting=1),
                                engine_factory=SlowEngine)
        with pytest.raises(InvalidRequest):  # token id outside the vocabulary
            async for _ in engine.generate([10**6], GREEDY, "bad"):
                pass
        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        running = engine.generate([5, 6], long, "running")
        await anext(running)  # now it holds the only running slot
        waiting = engine.generate([5, 6], long, "waiting")
        waiting_first = asyncio.ensure_future(anext(waiting))
        while engine.stats.num_waiting < 1:  # let the step loop queue it
            await asyncio.sleep(0.01)
        with pytest.raises(CapacityExceeded):
            async for _ in engine.generate([5, 6], GREEDY, "refused"):
                pass
        await running.aclose()
        await waiting_first
        await waiting.aclose()
        await _wait_idle(engine)
        await engine.stop()

    asyncio.run(main())


def test_close_and_cancel_abort_and_free_blocks(tiny_model_dir):
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        engine = await _started(tiny_engine_config(tiny_model_dir))
        closed = engine.generate([5, 6, 7], long, "closed")
        await anext(closed)

        async def consume():
            async for _ in engine.generate([8, 9], long, "cancelled"):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        assert engine.stats.kv_cache_usage > 0
        await closed.aclose()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_idle(engine)
        assert engine.num_in_flight == 0
        await engine.stop()

    asyncio.run(main())


class _BrokenEngine(LLMEngine):
    def step(self):
        raise RuntimeError("device on fire")


def test_dead_loop_fails_streams_and_later_calls(tiny_model_dir):
    async def main():
        engine = await _started(tiny_engine_config(tiny_model_dir), engine_factory=_BrokenEngine)
        with pytest.raises(EngineDead, match="device on fire"):
            async for _ in engine.generate([5], GREEDY, "x"):
                pass
        assert engine.is_dead
        with pytest.raises(EngineDead):
            async for _ in engine.generate([5], GREEDY, "y"):
                pass
        await engine.stop()

    asyncio.run(main())


def test_load_failure_is_reported(tiny_model_dir):
    def fail(config):
        raise ModelLoadError("no such model")

    async def main():
        engine = AsyncLLM(tiny_engine_config(tiny_model_dir), engine_factory=fail)
        engine.start()
        with pytest.raises(ModelLoadError):
            await engine.wait_loaded(timeout=10)
        with pytest.raises(EngineDead):
            await anext(engine.generate([5], GREEDY, "x"))

    asyncio.run(main())


def test_drain_waits_then_aborts(tiny_model_dir):
    async def main():
        engine = await _started(tiny_engine_config(tiny_model_dir))
        assert await engine.drain(timeout=1)  # nothing in flight
        short = engine.generate([5, 6], GREEDY, "short")
        task = asyncio.create_task(_collect(short))
        assert await engine.drain(timeout=30)
        assert (await task)[-1].finished
        endless = engine.generate([5, 6], SamplingParams(max_tokens=400, ignore_eos=True), "long")
        await anext(endless)
        assert not await engine.drain(timeout=0.2)
        with pytest.raises(EngineDead, match="shutting down"):
            await _collect(endless)
        await _wait_idle(engine)
        await engine.stop()

    asyncio.run(main())


async def _collect(gen):
    return [o async for o in gen]


def test_idle_loop_does_not_spin(tiny_model_dir):
    async def main():
        engine = await _started(tiny_engine_config(tiny_model_dir))
        await _collect(engine.generate([5], GREEDY, "warm"))
        await asyncio.sleep(0.1)
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(1.0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        await engine.stop()
        return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    assert asyncio.run(main()) < 0.2


def test_abort_ends_the_stream(tiny_model_dir):
    async def main():
        engine = await _started(tiny_engine_config(tiny_model_dir), engine_factory=SlowEngine)
        stream = engine.generate([5, 6], SamplingParams(max_tokens=400, ignore_eos=True), "x")
        first = await anext(stream)
        engine.abort("x")
        rest = await asyncio.wait_for(_collect(stream), 10)
        await _wait_idle(engine)
        await engine.stop()
        return [first, *rest]

    outs = asyncio.run(main())
    assert not outs[-1].finished
