"""The reference for `factory bench pipeline --reference`: LangGraph with its PostgreSQL
checkpointer, running the same pipelines as the bench: phase1 (five stages in a chain) and
full (17 stages, a DAG whose ready stages run in parallel).

Each stage is a plain function that adds its output to the run's state; the graph is built
from the pipelines the bench passes in REFERENCE_PIPELINES (JSON: pipeline name -> list of
{"name", "inputs"}) and checkpointed by `AsyncPostgresSaver` in the database
REFERENCE_DATABASE on the server of REFERENCE_DATABASE_URL. As in the Factory's bench, there
is no model latency: what is measured is the framework's own cost per step, durably recorded.

Usage: langgraph_pipeline.py SINGLE_RUNS FULL_RUNS CONCURRENT_RUNS. Prints one JSON line per
figure on stdout:
  {"figure": "stage_p50_ms", "value": ...}       per-stage time of sequential phase1 runs
  {"figure": "full_wall_ms_p50", "value": ...}   wall time of sequential full runs
  {"figure": "stages_per_s", "value": ..., "runs": N}   N phase1 runs at once, all completing

Installed by `./factory bench pipeline --reference` into .factory/reference-venv (pinned
versions in ./factory); nothing of it runs in `up` or in the tests.
"""

import asyncio
import json
import operator
import os
import statistics
import sys
import time
import uuid
from typing import Annotated, TypedDict

from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

# As many connections as the Factory's bench pools hold.
POOL_SIZE = 10


class RunState(TypedDict):
    requirement: str
    # Parallel stages each add their own key; the reducer merges them.
    outputs: Annotated[dict, operator.or_]


def stage(name):
    def work(state: RunState):
        return {"outputs": {name: f"{name}: done for {state['requirement'][:40]}"}}

    return work


def graph(stages, checkpointer):
    builder = StateGraph(RunState)
    feeds = {input for s in stages for input in s["inputs"]}
    for s in stages:
        builder.add_node(s["name"], stage(s["name"]))
    for s in stages:
        if not s["inputs"]:
            builder.add_edge(START, s["name"])
        elif len(s["inputs"]) == 1:
            builder.add_edge(s["inputs"][0], s["name"])
        else:
            # Waits for every input, as the Factory's orchestrator does.
            builder.add_edge(list(s["inputs"]), s["name"])
        if s["name"] not in feeds:
            builder.add_edge(s["name"], END)
    return builder.compile(checkpointer=checkpointer)


def figure(name, value, **extra):
    print(json.dumps({"figure": name, "value": round(value, 3), **extra}), flush=True)


async def main(single_runs, full_runs, concurrent_runs):
    pipelines = json.loads(os.environ["REFERENCE_PIPELINES"])
    # The server's URL and, in place of its database, the scratch one the bench made.
    url = make_conninfo(os.environ["REFERENCE_DATABASE_URL"], dbname=os.environ["REFERENCE_DATABASE"])
    kwargs = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
    async with AsyncConnectionPool(url, max_size=POOL_SIZE, kwargs=kwargs, open=False) as pool:
        checkpointer = AsyncPostgresSaver(pool)
        await checkpointer.setup()
        apps = {name: (graph(stages, checkpointer), len(stages)) for name, stages in pipelines.items()}

        async def run(pipeline):
            app, stages = apps[pipeline]
            config = {"configurable": {"thread_id": str(uuid.uuid4())}}
            state = await app.ainvoke({"requirement": "Build a URL shortener with expiry", "outputs": {}}, config)
            if len(state["outputs"]) != stages:
                raise RuntimeError(f"a {pipeline} run ended with {len(state['outputs'])} of {stages} stages")

        # Warm up, as the Factory's bench does: a phase1 and a full run, and a few more.
        for _ in range(3):
            await run("phase1")
            await run("full")

        phase1_stages = apps["phase1"][1]
        per_stage_ms = []
        for _ in range(single_runs):
            started = time.perf_counter()
            await run("phase1")
            per_stage_ms.append((time.perf_counter() - started) * 1000 / phase1_stages)
        figure("stage_p50_ms", statistics.median(per_stage_ms))

        walls_ms = []
        for _ in range(full_runs):
            started = time.perf_counter()
            await run("full")
            walls_ms.append((time.perf_counter() - started) * 1000)
        figure("full_wall_ms_p50", statistics.median(walls_ms))

        # One burst of the same size first, not measured, as the Factory's bench does: the
        # server's first load of that size (a fresh cluster's first WAL segments) is not
        # what either is measured on.
        await asyncio.gather(*(run("phase1") for _ in range(concurrent_runs)))
        started = time.perf_counter()
        await asyncio.gather(*(run("phase1") for _ in range(concurrent_runs)))
        elapsed = time.perf_counter() - started
        figure("stages_per_s", concurrent_runs * phase1_stages / elapsed, runs=concurrent_runs)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
