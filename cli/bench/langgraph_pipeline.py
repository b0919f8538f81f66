"""The reference for `factory bench pipeline --reference`: LangGraph with its PostgreSQL
checkpointer, running the same shape of work as the bench's phase1 runs.

A run is a graph of five nodes in a chain (ba -> sa -> backend -> qa -> docs), each a
plain function that adds its output to the state, checkpointed by `AsyncPostgresSaver` in
the database REFERENCE_DATABASE on the server of REFERENCE_DATABASE_URL. As in the Factory's bench, there is no model
latency: what is measured is the framework's own cost per step, durably recorded.

Prints one JSON line per figure on stdout:
  {"figure": "stage_p50_ms", "value": ...}     per-stage time of sequential runs
  {"figure": "stages_per_s", "value": ..., "runs": N}   N runs at once, all completing

Installed by `./factory bench pipeline --reference` into .factory/reference-venv (pinned
versions in ./factory); nothing of it runs in `up` or in the tests.
"""

import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from typing import TypedDict

from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

STAGES = ["business-analysis", "solution-architecture", "backend-engineering", "qa", "documentation"]
# As many connections as the Factory's bench pools hold.
POOL_SIZE = 10


class RunState(TypedDict):
    requirement: str
    outputs: dict


def stage(name):
    def work(state: RunState):
        outputs = dict(state.get("outputs") or {})
        outputs[name] = f"{name}: done for {state['requirement'][:40]}"
        return {"outputs": outputs}

    return work


def pipeline(checkpointer):
    graph = StateGraph(RunState)
    previous = START
    for name in STAGES:
        graph.add_node(name, stage(name))
        graph.add_edge(previous, name)
        previous = name
    graph.add_edge(previous, END)
    return graph.compile(checkpointer=checkpointer)


def figure(name, value, **extra):
    print(json.dumps({"figure": name, "value": round(value, 3), **extra}), flush=True)


async def main(single_runs, concurrent_runs):
    # The server's URL and, in place of its database, the scratch one the bench made.
    url = make_conninfo(os.environ["REFERENCE_DATABASE_URL"], dbname=os.environ["REFERENCE_DATABASE"])
    kwargs = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
    async with AsyncConnectionPool(url, max_size=POOL_SIZE, kwargs=kwargs, open=False) as pool:
        checkpointer = AsyncPostgresSaver(pool)
        await checkpointer.setup()
        app = pipeline(checkpointer)

        async def run():
            config = {"configurable": {"thread_id": str(uuid.uuid4())}}
            state = await app.ainvoke({"requirement": "Build a URL shortener with expiry", "outputs": {}}, config)
            if len(state["outputs"]) != len(STAGES):
                raise RuntimeError(f"a run ended with {len(state['outputs'])} of {len(STAGES)} stages")

        for _ in range(5):
            await run()
        per_stage_ms = []
        for _ in range(single_runs):
            started = time.perf_counter()
            await run()
            per_stage_ms.append((time.perf_counter() - started) * 1000 / len(STAGES))
        figure("stage_p50_ms", statistics.median(per_stage_ms))

        started = time.perf_counter()
        await asyncio.gather(*(run() for _ in range(concurrent_runs)))
        figure("stages_per_s", concurrent_runs * len(STAGES) / (time.perf_counter() - started), runs=concurrent_runs)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
