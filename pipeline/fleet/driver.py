"""The driver: submit each stage as a Ray task once its upstream succeeded, print one line as each
starts and ends, collect the results into dvc.lock, and summarise what ran, was cached, failed.

Ray semantics relied on (docs.ray.io, "Task Fault Tolerance"): a task whose worker process dies is
retried up to `max_retries` times; an exception raised by the task is an application error and
is not retried unless `retry_exceptions` says so. So a killed worker reruns the stage in a fresh
clone, and a stage that fails by itself fails once and stops only what depends on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.fleet.dag import StageNode, descendants
from pipeline.fleet.resources import Resources, unschedulable
from pipeline.fleet.task import StageFailed, TaskResult, TaskSpec, pack, read_lock, run_stage, unpack, write_locks

POLL_S = 0.5


@dataclass
class Outcome:
    stage: str
    status: str  # ran | cached | failed | skipped | unschedulable
    node: str = ""
    seconds: float = 0.0
    reason: str = ""


@dataclass
class FleetRun:
    """Everything the driver needs; `resources` and `link_dirs` are per stage name."""

    root: Path
    stages: list[StageNode]
    resources: dict[str, Resources]
    repo: str
    commit: str
    remote: str
    link_dirs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stages pinned to the driver's node
    env_links: tuple[str, ...] = ()  # untracked paths of the driver's checkout linked into every clone
    max_retries: int = 3
    node_wait_s: float = 0.0
    workdir: str | None = None


def _remote_stage(spec: TaskSpec, queue) -> TaskResult:
    import ray

    context = ray.get_runtime_context()
    node = _node_name(context.get_node_id())
    queue.put(("start", spec.stage, node, time.time()))
    return run_stage(spec, node)


def _node_name(node_id: str) -> str:
    import ray

    for n in ray.nodes():
        if n["NodeID"] == node_id:
            return f"{n.get('NodeManagerAddress', '?')}/{node_id[:8]}"
    return node_id[:8]


def run(fleet: FleetRun, echo: Callable[[str], None] = print) -> list[Outcome]:
    import ray
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(_remote_stage)
    queue = Queue(actor_options={"num_cpus": 0})
    outcomes: dict[str, Outcome] = {}
    locks: dict[str, Any] = {}
    blobs: dict[str, bytes] = {}
    by_name = {s.name: s for s in fleet.stages}
    _check_schedulable(fleet, outcomes, echo)
    for name in up_to_date(fleet.root, fleet.stages):
        if name not in outcomes:
            locks[name] = read_lock(fleet.root / "dvc.lock")[name]
            blobs[name] = pack(fleet.root, by_name[name].uncached_outs)
            outcomes[name] = Outcome(name, "cached", node="driver", reason="up to date here (dvc status)")
            echo(f"cached  {name}: up to date in {fleet.root}")
    pending: dict[Any, str] = {}
    driver_node = ray.get_runtime_context().get_node_id()
    while True:
        for stage in fleet.stages:
            if stage.name in outcomes or stage.name in pending.values():
                continue
            # Decided once every upstream has ended, so the summary names the same first blocker
            # whatever order the upstream stages finished in.
            if any(u in by_name and u not in outcomes for u in stage.upstream):
                continue
            blocked = sorted(u for u in stage.upstream if u in by_name and outcomes[u].status not in ("ran", "cached"))
            if blocked:
                outcomes[stage.name] = Outcome(stage.name, "skipped", reason=f"upstream {blocked[0]} "
                                               f"{outcomes[blocked[0]].status}")
                continue
            if stage.name in fleet.link_dirs and any(pending[r] in fleet.link_dirs for r in pending):
                continue  # stages writing into the driver's directories run one at a time
            spec = TaskSpec(stage=stage.name, repo=fleet.repo, commit=fleet.commit, remote=fleet.remote,
                            upstream_locks={u: locks[u] for u in stage.upstream if u in locks},
                            uncached={u: blobs[u] for u in stage.upstream if u in blobs},
                            uncached_outs=stage.uncached_outs, link_dirs=fleet.link_dirs.get(stage.name, ()),
                            env_links=fleet.env_links,
                            driver_root=str(fleet.root), workdir=fleet.workdir)
            options = fleet.resources[stage.name].ray_options()
            if stage.name in fleet.link_dirs:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(driver_node, soft=False)
            ref = remote.options(name=stage.name, max_retries=fleet.max_retries, retry_exceptions=False,
                                 **options).remote(spec, queue)
            pending[ref] = stage.name
        if not pending:
            break
        done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
        _drain(queue, echo)
        for ref in done:
            name = pending.pop(ref)
            outcomes[name] = _collect(fleet.root, ref, name, locks, blobs, echo)
    _drain(queue, echo)
    if locks:
        write_locks(fleet.root / "dvc.lock", {s.name: locks[s.name] for s in fleet.stages if s.name in locks})
    return [outcomes[s.name] for s in fleet.stages]


def up_to_date(root: Path, stages: list[StageNode]) -> list[str]:
    """Stages that, with all their ancestors, `dvc status` finds unchanged in the driver's workspace:
    what a plain `dvc repro` here would skip ("didn't change"). DVC's run cache cannot stand in for
    this: it never saves a stage with a `cache: false` output that is not a metric or plot
    (dvc/stage/__init__.py `Stage.run`: `run_cache=not no_commit and not no_cache_outs`)."""
    from dvc.repo import Repo

    lock = read_lock(root / "dvc.lock")
    with Repo(str(root)) as repo:
        changed = set(repo.status(targets=[s.name for s in stages if s.name in lock]))
    fresh: set[str] = set()
    for stage in stages:  # topological: a stage is fresh only when everything above it is
        if stage.name in lock and stage.name not in changed and all(u in fresh for u in stage.upstream):
            fresh.add(stage.name)
    return [s.name for s in stages if s.name in fresh]


def _check_schedulable(fleet: FleetRun, outcomes: dict[str, Outcome], echo) -> None:
    """Mark stages no node can ever run (and what depends on them), waiting at most node_wait_s
    for an autoscaler to add a node: Ray itself would leave such a task pending forever."""
    import ray

    deadline = time.monotonic() + fleet.node_wait_s
    while True:
        nodes = ray.nodes()
        why = {s.name: unschedulable(fleet.resources[s.name], nodes) for s in fleet.stages}
        if not any(why.values()) or time.monotonic() >= deadline:
            break
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    for stage in fleet.stages:
        if why[stage.name] and stage.name not in outcomes:
            outcomes[stage.name] = Outcome(stage.name, "unschedulable", reason=why[stage.name])
            echo(f"unschedulable {stage.name}: {why[stage.name]}")
            for below in descendants(fleet.stages, stage.name):
                outcomes.setdefault(below, Outcome(below, "skipped", reason=f"upstream {stage.name} unschedulable"))


def _collect(root: Path, ref, name: str, locks, blobs, echo) -> Outcome:
    import ray

    try:
        result: TaskResult = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if not isinstance(cause, StageFailed):
            raise
        echo(f"failed  {name}: {cause.step}\n{_indent(cause.tail)}")
        lines = cause.tail.splitlines()
        last = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "")
        return Outcome(name, "failed", reason=f"{cause.step}: {last}")
    except ray.exceptions.RayError as exc:  # retries exhausted, node lost, cancelled
        reason = str(exc).strip().splitlines()[0]
        echo(f"failed  {name}: {reason}")
        return Outcome(name, "failed", reason=reason)
    locks[name] = result.lock_entry
    if result.uncached:
        blobs[name] = result.uncached
        unpack(result.uncached, root)
    status = "cached" if result.cached else "ran"
    echo(f"end     {name} on {result.node}: {status} in {result.seconds:.1f} s")
    return Outcome(name, status, node=result.node, seconds=result.seconds)


def _drain(queue, echo) -> None:
    while not queue.empty():
        _, stage, node, _ = queue.get_nowait()
        echo(f"start   {stage} on {node}")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def summary(outcomes: list[Outcome], wall_s: float) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ran", "cached", "failed", "unschedulable", "skipped")}
    lines = [f"fleet: {len(outcomes)} stage(s) in {wall_s:.1f} s: " + ", ".join(f"{v} {k}" for k, v in counts.items())]
    width = max((len(o.stage) for o in outcomes), default=0)
    for o in outcomes:
        where = f"{o.node} {o.seconds:6.1f} s" if o.node else ""
        lines.append(f"  {o.stage:<{width}}  {o.status:<13} {where}{'  ' + o.reason if o.reason else ''}")
    return "\n".join(lines)
