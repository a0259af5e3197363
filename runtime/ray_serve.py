"""Scale out on Ray Serve: many replicas of one engine behind one OpenAI-compatible endpoint, on one machine or
a cluster (`python -m runtime.serve ARTIFACT --replicas N`, or `serve run` with a config file: `app_builder`).

Two deployments make the application:
- `EngineReplica` (N of them, or autoscaled): each owns one Session and its Service (continuous batching, prefix
  cache) and streams a job's events back in batches.
- the ingress: the single-process server's HTTP layer (runtime/serve.py's Server) over a `RemoteService`, an
  adapter with the Service's surface whose jobs run on the replicas. Requests are parsed, checked and refused
  there exactly as the single-process server does; the replicas only generate. `OpenAIIngress` sits behind Ray
  Serve's HTTP proxy (`serve run`, KubeRay); `ListeningIngress` listens on --port itself (the command line's
  default), which spares each request the proxy's process hop.

A request goes to the replica whose prefix cache already holds the longest start of its prompt (the
`PrefixAffinityRouter`, Ray Serve's pluggable request router), unless that replica is busier than the least
loaded one by more than `affinity_slack` requests; then to the least loaded one.

This is the only module of the runtime that imports ray (`pip install 'lmforge[ray]'`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

import runtime
from runtime import artifact as artifacts
from runtime.errors import ArtifactError, BadInputError, LmforgeError
from runtime.generate import GenerationConfig
from runtime.prefix_cache import BLOCK
from runtime.serve import API_KEY_ENV, Access, Limits, Metrics, api_key_from, create_app, startup_line
from runtime.service import (
    Event,
    QueueFullError,
    Service,
    ServiceClosedError,
    ServiceConfig,
    check_request,
    slot_context,
)
from runtime.session import SessionOptions

logger = logging.getLogger("ray.serve")  # Serve routes this logger into each replica's log file

APP_NAME = "lmforge"
ENGINE = "EngineReplica"
INGRESS = "OpenAIIngress"
DEFAULT_CACHE_DIR = "/tmp/lmforge-artifacts"
CHUNK_BYTES = 16 << 20  # per fetch from the driver: large enough to stream, small enough for any object store
STARTED, REFUSED = "started", "refused"  # replica-to-ingress events that never reach the HTTP layer
# A replica's process or node went away, or Serve could not reach it: the request never finished there.
REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError, ReplicaUnavailableError)


# -- settings ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleOut:
    """How many replicas, how big, and how they scale; None fields take the defaults that `resolved` gives."""

    replicas: int = 1
    min_replicas: int | None = None  # autoscaling lower bound (default: replicas)
    max_replicas: int | None = None  # autoscaling upper bound (default: replicas; above min turns autoscaling on)
    target_ongoing: float | None = None  # per replica, what the autoscaler steers to (default: max_batch / 2)
    threads: int | None = None  # ONNX Runtime threads per replica (default: this node's cores / max_replicas)
    ingress_replicas: int = 1
    drain_timeout_s: float = 30  # shutting down, running requests get this long to finish
    affinity_slack: int | None = None  # ongoing requests a prefix match may cost (default: max_batch / 4)
    cache_dir: str = DEFAULT_CACHE_DIR  # where a node without the artifact's path keeps its fetched copy

    def resolved(self, max_batch: int) -> ScaleOut:
        low = self.replicas if self.min_replicas is None else self.min_replicas
        high = max(low, self.replicas) if self.max_replicas is None else self.max_replicas
        # Half the slots: decode cost grows with the rows (docs/serving.md: 16 rows cost 3.3x one), so at half
        # a replica gives ~80% of its full throughput at ~60% of its full inter-token latency, and the free half
        # absorbs a burst while a new replica loads its engine.
        target = self.target_ongoing if self.target_ongoing is not None else max(1.0, max_batch / 2)
        threads = self.threads or max(1, (os.cpu_count() or 1) // max(1, high))
        slack = self.affinity_slack if self.affinity_slack is not None else max(1, max_batch // 4)
        return replace(self, min_replicas=low, max_replicas=high, target_ongoing=target, threads=threads,
                       affinity_slack=slack)

    def validate(self) -> None:
        if self.replicas < 1 or self.ingress_replicas < 1:
            raise BadInputError("replicas and ingress-replicas must be at least 1")
        if self.min_replicas is not None and self.min_replicas < 1:
            raise BadInputError(f"min-replicas must be at least 1 (an engine takes too long to load to scale from "
                                f"zero on demand), got {self.min_replicas}")
        if None not in (self.min_replicas, self.max_replicas) and self.max_replicas < self.min_replicas:
            raise BadInputError(f"max-replicas {self.max_replicas} is below min-replicas {self.min_replicas}")
        if self.drain_timeout_s < 0:
            raise BadInputError(f"drain-timeout must be >= 0, got {self.drain_timeout_s}")


def replica_queue(max_batch: int) -> int:
    """Requests one replica holds at most: its slots plus a short queue. The short queue lets its scheduler admit
    the next request at the next step without a routing round trip; a deep one would pin waiting requests to one
    replica while another frees up, and leave less for the router to balance."""
    return max_batch + max(1, max_batch // 4)


def initial_replicas(scale: ScaleOut) -> int:
    return min(max(scale.replicas, scale.min_replicas), scale.max_replicas)


def autoscaling(scale: ScaleOut, max_batch: int) -> dict | None:
    """Ray Serve's autoscaling_config, or None for a fixed count. Upscale after 10 s of load above target (Ray's
    default 30 s leaves a burst queueing for longer than an engine takes to load); downscale after 300 s below
    (a replica's prefix cache is warm state and a reload costs its load time: no flapping on a lull)."""
    if scale.max_replicas <= scale.min_replicas:
        return None
    return {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
            "initial_replicas": initial_replicas(scale),
            "target_ongoing_requests": scale.target_ongoing, "upscale_delay_s": 10, "downscale_delay_s": 300}


# -- the artifact on every node ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactSpec:
    """What a replica needs to find its artifact: the path, the manifest the driver read there (what the files
    must hash to), and, where nodes may lack the path, an ArtifactSource to fetch it from."""

    path: str
    manifest: dict
    source: object = None  # an ArtifactSource actor handle, or None: the path must exist on every node
    cache_dir: str = DEFAULT_CACHE_DIR

    @property
    def folder_name(self) -> str:
        return artifacts.folder_name(self.manifest["stage"], self.manifest["id"])


class ArtifactSource:
    """Hands out an artifact's files in chunks, from the node where the driver found it (a Ray actor)."""

    def __init__(self, path: str, names: list[str]):
        self.path, self.names = Path(path), set(names)

    def read(self, name: str, offset: int, size: int) -> bytes:
        if name not in self.names:  # only the manifest's files, never an arbitrary path on this node
            raise ArtifactError(f"{name!r} is not a file of artifact {self.path}")
        with open(self.path / name, "rb") as file:
            file.seek(offset)
            return file.read(size)


def start_artifact_source(path: str, manifest: dict):
    """An ArtifactSource pinned to this node; it lives as long as this driver does."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0)(ArtifactSource).options(scheduling_strategy=here)
    return actor.remote(path, list(manifest["files"]))


def wanted_files(manifest: dict, only: tuple[str, ...] | None) -> dict:
    files = manifest["files"]
    return dict(files) if only is None else {name: entry for name, entry in files.items() if name in only}


def holds(folder: Path, manifest: dict, files: dict) -> bool:
    """Whether `folder` is this very artifact (same id and hashes) with the files wanted present."""
    try:
        found = json.loads((folder / artifacts.MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    same = found.get("id") == manifest["id"] and found.get("files") == manifest["files"]
    return same and all((folder / name).is_file() for name in files)


def node_artifact(spec: ArtifactSpec, only: tuple[str, ...] | None = None) -> artifacts.Artifact:
    """The artifact on this node with its files verified against the driver's manifest; fetched from the driver
    (once per node) where the path is absent. `only`: the files this process reads (the ingress: the tokenizer).
    Raises ArtifactError: a replica that cannot verify its artifact never serves."""
    files = wanted_files(spec.manifest, only)
    folder = Path(spec.path)
    if holds(folder, spec.manifest, files):
        artifacts.verify_files(folder, {"files": files})
    elif spec.source is not None:
        folder = fetched_once_per_node(spec, files)
    else:
        raise ArtifactError(f"artifact {spec.path} (id {spec.manifest['id']}) is not on node "
                            f"{ray.get_runtime_context().get_node_id()}: put it on a path every node sees, or start "
                            "the application with `python -m runtime.serve`, whose driver hands it to each node")
    return artifacts.Artifact(folder, spec.manifest)


def fetched_once_per_node(spec: ArtifactSpec, files: dict) -> Path:
    """The node's copy under cache_dir: the first replica on a node fetches it while the others wait on a lock,
    then find it. Each use verifies it; a damaged copy is fetched again."""
    cache = Path(spec.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    suffix = "" if len(files) == len(spec.manifest["files"]) else "-partial"
    target = cache / (spec.folder_name + suffix)
    with open(cache / f".{spec.folder_name}{suffix}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if holds(target, spec.manifest, files):
            try:
                artifacts.verify_files(target, {"files": files})
                return target
            except ArtifactError:
                shutil.rmtree(target)
        land(spec, files, target)
    return target


def land(spec: ArtifactSpec, files: dict, target: Path) -> None:
    """Copy the files from the source into a temporary folder, verify them, write the manifest, rename."""
    temporary = target.with_name(f"{artifacts.TEMP_PREFIX}{target.name}-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        for name in files:
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ArtifactError(f"the manifest of {spec.path} names {name!r}, outside the artifact")
            copy_file(spec.source, name, temporary / name)
        logger.info("fetched %d files of artifact %s from the driver into %s", len(files), spec.manifest["id"], target)
        artifacts.verify_files(temporary, {"files": files})
        (temporary / artifacts.MANIFEST).write_text(json.dumps(spec.manifest))
        shutil.rmtree(target, ignore_errors=True)
        os.rename(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def copy_file(source, name: str, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(destination, "wb") as out:
        offset = 0
        while True:
            chunk = ray.get(source.read.remote(name, offset, CHUNK_BYTES))
            out.write(chunk)
            offset += len(chunk)
            if len(chunk) < CHUNK_BYTES:
                return


# -- the engine replica -----------------------------------------------------------------------------------------


def replica_label() -> str:
    """The replica's id as Serve names it (in `serve status` and its log file), or this process outside Serve."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a replica (a direct test)
        return f"pid{os.getpid()}"


async def event_batches(job):
    """The job's events, each batch holding whatever arrived since the last: under load the ingress reads less
    often than the engine steps, and one message per batch costs the same as one per token."""
    pending: list[Event] = []
    arrived = asyncio.Event()

    async def pump():
        async for event in job:
            pending.append(event)
            arrived.set()

    task = asyncio.ensure_future(pump())
    task.add_done_callback(lambda _: arrived.set())  # a pump that broke wakes the reader too
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            if not pending and task.done():
                task.result()  # raises what broke the job's stream
                return
            batch, pending[:] = list(pending), []
            yield batch
            if batch[-1].kind in ("done", "error"):
                return
    finally:
        task.cancel()


class EngineReplica:
    """One Session and its Service. A replica whose artifact fails verification raises here, so Serve never marks
    it ready: the error is in its log and in `serve status`, and it takes no traffic."""

    def __init__(self, spec: ArtifactSpec, threads: int, config: ServiceConfig):
        self.replica = replica_label()
        try:
            artifact = node_artifact(spec)
        except ArtifactError as exc:
            logger.error("replica %s will not serve: %s", self.replica, exc)
            raise ArtifactError(f"replica {self.replica} will not serve: {exc}") from None
        self.metrics = Metrics()
        self.service = Service(runtime.open(artifact, SessionOptions(threads=threads)), config, self.metrics)
        self.metrics.watch(self.service)
        logger.info("replica %s: %s", self.replica, startup_line(self.service))

    async def generate(self, prompt: list[int], config: GenerationConfig, logprobs: int | None = None,
                       prompt_logprobs: bool = False):
        """Lists of Events; the first batch opens with (STARTED, (cached tokens, replica)). Refusals that another
        replica may not give (a full queue, a replica shutting down) come as REFUSED, so the ingress may retry."""
        try:
            job = self.service.submit(prompt, config, logprobs, prompt_logprobs)
        except (QueueFullError, ServiceClosedError) as exc:
            yield [Event(REFUSED, str(exc))]
            return
        except LmforgeError as exc:
            yield [Event("error", str(exc))]
            return
        opened = False
        try:
            async for batch in event_batches(job):
                if not opened:
                    batch.insert(0, Event(STARTED, (job.cached_tokens, self.replica)))
                    opened = True
                yield batch
        finally:
            job.cancel()  # no-op when it finished; frees the slot when the caller's stream was cancelled

    def describe(self) -> dict:
        return {"replica": self.replica, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "max_context": self.service.max_context, "scheduler": self.service.scheduler,
                "why": self.service.why, "max_batch": self.service.config.max_batch}

    def health(self) -> dict:
        return self.describe() | {"ok": self._worker_alive()} | self.service.stats()

    def metric_families(self) -> tuple[str, list]:
        registry = self.metrics.registry
        return self.replica, (list(registry.collect()) if registry is not None else [])

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising gets the replica replaced."""
        if not self._worker_alive():
            raise RuntimeError(f"replica {self.replica}: the service's worker thread is gone")

    def _worker_alive(self) -> bool:
        return self.service.alive

    def __del__(self):
        # Serve calls this after draining (graceful_shutdown_timeout_s): whatever still runs is cut short.
        service = getattr(self, "service", None)
        if service is not None:
            service.close(timeout=1)


# -- routing that keeps prefix caches warm ----------------------------------------------------------------------


def prefix_keys(prompt, limit: int) -> list[int]:
    """One key per whole block of the prompt's start (at most `limit`), each naming the whole prefix up to its
    block's end, as a replica's prefix cache keys what it stores (runtime/prefix_cache.py)."""
    if not isinstance(prompt, list):
        return []
    keys, parent = [], 0
    for start in range(0, min(len(prompt) - BLOCK + 1, limit * BLOCK), BLOCK):
        parent = hash((parent, tuple(prompt[start:start + BLOCK])))
        keys.append(parent)
    return keys


class PrefixAffinityRouter(RequestRouter):
    """Ray Serve request router: a request goes to the replica that was sent the longest start of its prompt
    (whole blocks, as the replicas cache them), unless that replica has more than `slack` ongoing requests above
    the least loaded one; then, and for prompts nothing matches, to the least loaded replica that has room.

    The table of who-was-sent-what lives in each router (one per ingress replica) and approximates the replicas'
    prefix caches: an entry that the replica has evicted since costs one prefill, never a wrong answer."""

    def initialize_state(self, slack: int = 4, max_blocks: int = 128, table_size: int = 1 << 17):
        self.slack, self.max_blocks, self.table_size = slack, max_blocks, table_size
        self.table: OrderedDict[int, OrderedDict] = OrderedDict()  # prefix key -> replicas sent it, latest last

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: back off instead of spinning
        # Shuffled: among equally loaded replicas the first listed wins, and new prefixes should spread.
        everyone = random.sample(candidate_replicas, len(candidate_replicas))
        matched = self.longest_match(self.keys_of(pending_request), everyone)
        if matched and self.load_of(matched) <= self.load_of(everyone) + self.slack:
            return [matched, everyone]
        return [everyone]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        for key in self.keys_of(pending_request):
            holders = self.table.pop(key, None) or OrderedDict()
            holders.pop(replica_id, None)
            holders[replica_id] = None
            while len(holders) > 4:  # a prefix on more replicas than that is spread by load anyway
                holders.popitem(last=False)
            self.table[key] = holders
        while len(self.table) > self.table_size:
            self.table.popitem(last=False)

    def keys_of(self, pending_request: PendingRequest | None) -> list[int]:
        args = pending_request.args if pending_request is not None else None
        return prefix_keys(args[0], self.max_blocks) if args else []

    def longest_match(self, keys: list[int], candidates: list[RunningReplica]) -> list[RunningReplica]:
        """The candidates that were sent the most of these keys' prefix, in a row from the first."""
        live = {replica.replica_id: replica for replica in candidates}
        best: list[RunningReplica] = []
        for key in keys:
            holders = [live[r] for r in self.table.get(key, ()) if r in live]
            if not holders:
                break
            best = holders
        return best

    def load_of(self, replicas: list[RunningReplica]) -> int:
        """The least ongoing-request count among them, as this router last knew it (unknown counts as idle)."""
        return min(self.replica_queue_len_cache.get(r.replica_id) or 0 for r in replicas)


# -- the ingress side: the Service's surface over the replicas --------------------------------------------------


class ReplicaLost(LmforgeError):
    pass


class RemoteJob:
    """A request running on some replica, with the surface the HTTP layer uses from runtime.service.Job: `id`,
    `cached_tokens`, `cancel()` and `async for event in job`.

    Retry policy: a request is retried once, on another replica, when its replica died or refused it before any
    event reached the client; a replica that dies after that ends it with an error (HTTP 500, or an error event
    in a stream that had started). Nothing streamed is ever streamed twice."""

    def __init__(self, service: RemoteService, prompt: list[int], config: GenerationConfig, logprobs: int | None,
                 prompt_logprobs: bool):
        self.service, self.prompt, self.config = service, prompt, config
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.id = uuid.uuid4().hex[:24]
        self.cached_tokens = 0
        self.replica: str | None = None
        self.cancelled = False
        self._call = None  # the stream from the replica while one runs

    def cancel(self) -> None:
        self.cancelled = True
        self._stop_call()
        self.service.release(self)

    def _stop_call(self) -> None:
        if self._call is not None:
            self._call.cancel()  # the replica's generator is cancelled there and frees the slot
            self._call = None

    async def __aiter__(self):
        try:
            for attempt in (1, 2):
                delivered = False
                try:
                    async for event in self._attempt():
                        delivered = True
                        yield event
                    return
                except (ReplicaLost, *REPLICA_LOST) as exc:
                    if self.cancelled:  # the caller stopped listening: nothing to tell, nothing to retry
                        return
                    if delivered or attempt == 2:
                        self.service.lost("failed")
                        yield Event("error", self._failure(exc))
                        return
                    self.service.lost("retried")
                    logger.warning("request %s: %s; retrying it once on another replica", self.id, self._failure(exc))
                except Exception as exc:  # whatever else went wrong ends this request, never the ingress
                    if not self.cancelled:
                        yield Event("error", f"internal error: {type(exc).__name__}: {exc}")
                    return
        finally:
            self.service.release(self)

    async def _attempt(self):
        call = self._call = self.service.streams.generate.remote(self.prompt, self.config, self.logprobs,
                                                                 self.prompt_logprobs)
        ended = False
        try:
            async for batch in call:
                for event in batch:
                    if event.kind == STARTED:
                        self.cached_tokens, self.replica = event.value
                    elif event.kind == REFUSED:
                        raise ReplicaLost(event.value)
                    else:
                        yield event
            ended = True
        finally:
            if ended:
                self._call = None
            else:
                self._stop_call()  # we stopped reading: the replica stops working on it

    def _failure(self, exc: Exception) -> str:
        where = f"replica {self.replica}" if self.replica else "its replica"
        if isinstance(exc, ReplicaLost):
            return f"{where} refused the request: {exc}"
        return (f"{where} failed while serving this request ({type(exc).__name__}); the other replicas keep "
                "serving: retry the request")


class NoReplicaReady(ServiceClosedError):
    """No engine replica is running (still loading, or failing to): HTTP 503, at once, instead of a request
    that waits for one."""


class RemoteService:
    """What runtime.serve's Server needs from a Service (`submit`, `config`, `max_context`, `stats`, `close`), for
    jobs that run on the replicas. `submit` checks a request with the very checks a Service makes, so it is
    refused here with the same errors, before anything is sent. The ingress keeps `state` (the engine
    deployment's status) fresh and tells it one replica's scheduler (`learn`)."""

    def __init__(self, engine, artifact: artifacts.Artifact, config: ServiceConfig, capacity: int):
        self.engine, self.artifact, self.config, self.capacity = engine, artifact, config, capacity
        self.streams = engine.options(stream=True)  # made once: options() builds a new handle each call
        self.max_context = slot_context(artifact.model_facts, config)
        self.scheduler = self.why = None  # until a replica says
        self.state = {"status": "STARTING", "running": 0, "message": ""}
        self.lost_counts = {"retried": 0, "failed": 0}
        self._jobs: set[RemoteJob] = set()
        self._closing = False

    def learn(self, facts: dict) -> None:
        self.scheduler, self.why = facts["scheduler"], facts["why"]

    def submit(self, prompt: list[int], config: GenerationConfig, logprobs: int | None = None,
               prompt_logprobs: bool = False) -> RemoteJob:
        if self.scheduler is None or not self.state["running"]:
            raise NoReplicaReady(f"no engine replica is ready (the deployment is {self.state['status']}"
                                 f"{failure_reason(self.state)}); retry later")
        config.validate()
        job = RemoteJob(self, list(prompt), config, logprobs, prompt_logprobs)
        check_request(job, self.artifact.model_facts["vocab_size"], self.max_context, self.scheduler, self.why)
        if self._closing:
            raise ServiceClosedError("the service is shutting down; retry on another replica")
        if len(self._jobs) >= self.capacity:
            raise QueueFullError(f"the replicas hold {self.capacity} requests already; retry later")
        self._jobs.add(job)
        return job

    def release(self, job: RemoteJob) -> None:
        self._jobs.discard(job)

    def lost(self, outcome: str) -> None:
        self.lost_counts[outcome] += 1

    @property
    def in_flight(self) -> int:
        return len(self._jobs)

    def stats(self) -> dict:
        return {"scheduler": self.scheduler, "why": self.why, "max_context": self.max_context,
                "in_flight": self.in_flight, "capacity": self.capacity}

    def close(self, timeout: float = 0) -> None:
        """No new requests. Serve drained this ingress before calling it, so whatever still runs is cut short."""
        self._closing = True
        for job in list(self._jobs):
            job.cancel()


def failure_reason(state: dict) -> str:
    """': <the replicas' error>' from a deployment's message (a traceback ends with it), or ''."""
    last = state["message"].strip().splitlines()[-1:] if state.get("message") else []
    return f": {last[0]}" if last else ""


class _Families:
    """Metric families in the shape prometheus_client's exposition reads (anything with collect())."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families


def labelled_families(replies: list[tuple[str, list]]) -> list:
    """The replicas' metric families merged by name, each sample labelled with its replica."""
    from prometheus_client.metrics_core import Metric

    merged: dict[str, Metric] = {}
    for replica, families in replies:
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            target.samples += [sample._replace(labels=sample.labels | {"replica": replica})
                               for sample in family.samples]
    return list(merged.values())


def ingress_families(service: RemoteService, ingress: str) -> list:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    lost = CounterMetricFamily("lmforge_replica_lost_requests", "Requests whose replica died or refused them: "
                               "retried once on another, or failed", labels=["outcome", "ingress"])
    for outcome, count in service.lost_counts.items():
        lost.add_metric([outcome, ingress], count)
    in_flight = GaugeMetricFamily("lmforge_ingress_in_flight", "Requests this ingress has on the replicas",
                                  labels=["ingress"])
    in_flight.add_metric([ingress], service.in_flight)
    return [lost, in_flight]


# -- the ingress deployment -------------------------------------------------------------------------------------


class IngressCore:
    """What both ingress deployments are: runtime/serve.py's app over a RemoteService, one OpenAI-compatible
    endpoint for every replica, with the engine deployment watched, and health and metrics over all replicas."""

    async def start(self, engine, spec: ArtifactSpec, config: ServiceConfig, name: str | None, limits: Limits,
                    capacity: int, replica_timeout_s: float = 10, access: Access = Access()) -> None:
        self.engine, self.timeout = engine, replica_timeout_s
        self.label = replica_label()
        self.app_name = serve.get_replica_context().app_name
        artifact = node_artifact(spec, only=artifacts.TEXT_FILES)
        self.service = RemoteService(engine, artifact, config, capacity)
        self.http_app = create_app(artifact, name, limits=limits, service=self.service, health=self.health,
                                   metrics=self.metrics, access=access)
        await self.wait_for_engine()
        self.watcher = asyncio.ensure_future(self.watch_engine())

    async def wait_for_engine(self) -> None:
        """Ready once a replica's facts are known, so no request meets a 503 just after startup; or once the engine
        deployment has failed, so that requests get a 503 that says why instead of waiting for a replica."""
        while self.service.scheduler is None and self.service.state["status"] != "DEPLOY_FAILED":
            await self.refresh()
            await asyncio.sleep(0.2)

    async def watch_engine(self, period_s: float = 2) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(period_s)

    async def refresh(self) -> None:
        """The service's view of the engine deployment, and one replica's facts once one runs."""
        try:
            self.service.state = await asyncio.to_thread(engine_status, self.app_name)
            if self.service.scheduler is None and self.service.state["running"]:
                self.service.learn(await asyncio.wait_for(self.engine.describe.remote(), self.timeout))
        except Exception as exc:  # the controller or a replica did not answer this time; ask again
            logger.warning("ingress %s: could not read the engine's state: %s", self.label, exc)

    def stop_watching(self) -> None:
        watcher = getattr(self, "watcher", None)
        if watcher is not None:
            watcher.cancel()

    async def health(self) -> tuple[int, dict]:
        """Ready (200) only when every replica the deployment wants is running and answers as healthy."""
        replies = await self.engine.broadcast("health").results_async(timeout_s=self.timeout, return_exceptions=True)
        answered = [r for r in replies if isinstance(r, dict)]
        wanted = await asyncio.to_thread(engine_status, self.app_name)
        ready = (bool(answered) and len(answered) == len(replies) and all(r["ok"] for r in answered)
                 and wanted["status"] == "HEALTHY" and wanted["running"] == len(answered))
        body = {"status": "ok" if ready else "unavailable", "engine": self.service.artifact.id,
                "replicas": answered, "deployment": wanted, "ingress": self.label} | self.service.stats()
        return (200 if ready else 503), body

    async def metrics(self) -> tuple[bytes, str]:
        """Every replica's metrics in one exposition, each sample labelled with its replica."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        replies = await self.engine.broadcast("metric_families").results_async(timeout_s=self.timeout,
                                                                                return_exceptions=True)
        families = labelled_families([r for r in replies if isinstance(r, tuple)])
        families += ingress_families(self.service, self.label)
        return generate_latest(_Families(families)), CONTENT_TYPE_LATEST


class OpenAIIngress(IngressCore):
    """The app behind Ray Serve's HTTP proxy (one per node): what `serve run` and KubeRay deploy. Serve drains the
    proxied requests before the app's shutdown runs."""

    async def __init__(self, *args, access: Access = Access()):
        await self.start(*args, access=access)

    def __serve_build_asgi_app__(self):
        return self.http_app

    def __del__(self):
        self.stop_watching()


def uvicorn_server(app, drain_timeout_s: float):
    """uvicorn's server without its signal handlers (in a replica, Ray owns the process's signals); stopping, it
    waits for open requests up to the drain timeout, then runs the app's shutdown."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return QuietServer(uvicorn.Config(app, log_level="warning",
                                      timeout_graceful_shutdown=max(1, math.ceil(drain_timeout_s))))


class ListeningIngress(IngressCore):
    """The app on its own HTTP listener inside the ingress replica (uvicorn on the driver's node, at --host and
    --port): no proxy process on the path, which is most of the Ray hop's cost (docs/scale-out.md). What
    `python -m runtime.serve --replicas N` runs unless --ray-proxy. Stopping, it drains its open requests, then
    the app's shutdown cuts what still runs."""

    # Its drain outlasts the replicas' by this much, so that a request they cut at their deadline reaches the
    # client as an error event rather than as a dropped connection.
    EXTRA_DRAIN_S = 5

    async def __init__(self, *args, host: str, port: int, drain_timeout_s: float, access: Access = Access()):
        await self.start(*args, access=access)
        listener = socket.create_server((host, port))  # a port already taken fails here, with its address
        self.drain_s = drain_timeout_s + self.EXTRA_DRAIN_S
        self.server = uvicorn_server(self.http_app, self.drain_s)
        self.serving = asyncio.ensure_future(self.server.serve(sockets=[listener]))

    async def __del__(self):
        self.stop_watching()
        self.server.should_exit = True  # stop accepting; running requests finish, then the app's shutdown runs
        try:
            await asyncio.wait_for(asyncio.shield(self.serving), self.drain_s + 5)
        except asyncio.TimeoutError:
            logger.warning("ingress %s: requests still open after the drain timeout", self.label)


def engine_status(app_name: str) -> dict:
    """The application's engine deployment: its status, running replicas and message, from the Serve controller."""
    app = serve.status().applications.get(app_name)
    deployment = app.deployments.get(ENGINE) if app is not None else None
    if deployment is None:
        return {"status": "MISSING", "running": 0, "message": ""}
    return {"status": str(deployment.status.value), "running": deployment.replica_states.get("RUNNING", 0),
            "message": deployment.message}


# -- building the application -----------------------------------------------------------------------------------


def build_application(artifact_path: str, scale: ScaleOut = ScaleOut(), config: ServiceConfig = ServiceConfig(),
                      limits: Limits = Limits(), name: str | None = None, source=None,
                      replica_class: type = EngineReplica, listen: tuple[str, int] | None = None,
                      access: Access = Access()):
    """The Serve application: the ingress bound to the engine deployment. The driver reads only the manifest;
    each replica verifies the files it loads where it runs. `listen`: (host, port) for a ListeningIngress on this
    node, else an OpenAIIngress behind Ray Serve's proxy. `replica_class`: EngineReplica or a subclass that
    wraps it (tests slow it down). `access`: the API key, which reaches the ingress as a bound argument (pickled
    through Ray's control plane, never on a command line; its repr is hidden); the engine replicas need none, as
    only the ingress takes requests."""
    scale.validate()
    config.validate()
    scale = scale.resolved(config.max_batch)
    manifest = artifacts.load(artifact_path, verify=False).manifest
    spec = ArtifactSpec(str(Path(artifact_path).resolve()), manifest, source, scale.cache_dir)
    engine = serve.deployment(replica_class).options(name=ENGINE, **engine_options(scale, config))
    capacity = scale.max_replicas * replica_queue(config.max_batch) + config.queue_size
    # A replica's own queue takes whatever Serve lets reach it (max_ongoing_requests): requests arrive faster than
    # its scheduler admits them, between two steps; the ingress's capacity is what refuses with a 429.
    at_replica = replace(config, queue_size=max(config.queue_size, replica_queue(config.max_batch)))
    args = (engine.bind(spec, scale.threads, at_replica), spec, config, name, limits, capacity)
    # Every open stream is an ongoing request of a proxied ingress; the OpenAI 429 comes from RemoteService first.
    common = {"max_ongoing_requests": capacity + 64, "graceful_shutdown_timeout_s": scale.drain_timeout_s + 15,
              "graceful_shutdown_wait_loop_s": 1}
    if listen is None:
        ingress = serve.deployment(serve.ingress()(OpenAIIngress)).options(
            name=INGRESS, num_replicas=scale.ingress_replicas, ray_actor_options={"num_cpus": 0}, **common)
        return ingress.bind(*args, access=access)
    here = {"num_cpus": 0, "resources": {f"node:{ray.util.get_node_ip_address()}": 0.001}}  # where --host is
    ingress = serve.deployment(ListeningIngress).options(name=INGRESS, num_replicas=1, ray_actor_options=here,
                                                         **common)
    return ingress.bind(*args, host=listen[0], port=listen[1], drain_timeout_s=scale.drain_timeout_s, access=access)


def engine_options(scale: ScaleOut, config: ServiceConfig) -> dict:
    router = RequestRouterConfig(request_router_class=PrefixAffinityRouter,
                                 request_router_kwargs={"slack": scale.affinity_slack})
    options = {"ray_actor_options": {"num_cpus": scale.threads},
               "max_ongoing_requests": replica_queue(config.max_batch),
               "graceful_shutdown_timeout_s": scale.drain_timeout_s, "graceful_shutdown_wait_loop_s": 1,
               "health_check_period_s": 5, "request_router_config": router}
    policy = autoscaling(scale, config.max_batch)
    return options | ({"autoscaling_config": policy} if policy else {"num_replicas": scale.replicas})


def app_builder(args: dict):
    """`serve run runtime.ray_serve:app_builder artifact=/models/engine replicas=2`, or a Serve config file's
    `import_path` with `args:` (KubeRay's RayService, deploy/rayservice.yaml): the command line's flags as keys,
    without the dashes. The artifact must be at that path on every node (no driver stays to hand it out).
    The API key comes from $LMFORGE_API_KEY where the application is built (a Kubernetes Secret on the head pod),
    so that it stays out of the Serve config; an `api_key` arg works too, and is as visible as that config."""
    from runtime.serve import build_parser

    options = build_parser().parse_args(builder_argv(args))
    access = Access(api_key_from(options.api_key), options.public_metrics)
    if access.key is None:  # Serve's proxy listens on every node: whoever reaches one may call the model
        logger.warning("no API key (%s is not set): anyone who can reach Ray Serve's proxy can run the model and "
                       "read its metrics; set it where the application is built", API_KEY_ENV)
    return build_application(options.artifact, scale_out(options), service_config(options), limits(options),
                             options.name, access=access)


def builder_argv(args: dict) -> list[str]:
    """The config's args as the command line would have them: {'max_replicas': 8} -> ['--max-replicas', '8']."""
    argv = [str(args["artifact"])]
    for key, value in args.items():
        if key != "artifact":
            flag = "--" + key.replace("_", "-")
            argv += [flag] if value is True else [] if value is False else [flag, str(value)]
    return argv


def scale_out(options) -> ScaleOut:
    return ScaleOut(replicas=options.replicas or 1, min_replicas=options.min_replicas,
                    max_replicas=options.max_replicas, target_ongoing=options.target_ongoing, threads=options.threads,
                    ingress_replicas=options.ingress_replicas, drain_timeout_s=options.drain_timeout,
                    affinity_slack=options.affinity_slack, cache_dir=options.artifact_cache)


def service_config(options) -> ServiceConfig:
    return ServiceConfig(max_batch=options.max_batch, max_context=options.max_context,
                         prefill_chunk=options.prefill_chunk, prefix_cache_mb=options.prefix_cache_mb,
                         queue_size=options.queue_size, continuous=not options.no_continuous_batching)


def limits(options) -> Limits:
    return Limits(options.max_tokens, options.max_prompt_tokens)


# -- the command line -------------------------------------------------------------------------------------------


def cluster_env() -> dict[str, str]:
    """What every process of the cluster should have in its environment (set before `ray start`; set here before
    a local cluster starts). Replicas run their code and their handles' routers on their own event loop instead
    of hopping between threads, and call each other over gRPC (docs/scale-out.md, the Ray hop). Nothing here blocks
    a replica's loop for long: the engine runs on the Service's worker thread."""
    return {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
            "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}


def connect(address: str | None) -> None:
    """Join the cluster at `address` ('auto': the one `ray start` made on this machine), or start one here
    (with a dashboard on loopback, which `serve status` reads)."""
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    for key, value in cluster_env().items():
        os.environ.setdefault(key, value)
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)


def cpu_shortfall(scale: ScaleOut) -> str | None:
    """What is missing when the replicas to start reserve more CPUs than the cluster has (they would never start)."""
    first = initial_replicas(scale)
    needed, have = first * scale.threads, ray.cluster_resources().get("CPU", 0)
    if needed <= have:
        return None
    return (f"{first} replicas x {scale.threads} threads reserve {needed} CPUs and the cluster has {have:g}: ask for "
            "fewer --replicas or --threads")


def main(options, access: Access = Access()) -> int:
    """`python -m runtime.serve ARTIFACT --replicas N [--ray-address auto]`: run until SIGINT or SIGTERM, then
    drain (each replica finishes its requests for up to --drain-timeout seconds) and stop. `access`: the API key
    runtime.serve read from --api-key or the environment."""
    try:
        scale, config = scale_out(options), service_config(options)
        scale.validate()
        config.validate()
        manifest = artifacts.load(options.artifact, verify=False).manifest
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        connect(options.ray_address)
    except ConnectionError as exc:
        print(f"error: no Ray cluster at {options.ray_address} ({exc}); start one with `ray start --head`",
              file=sys.stderr)
        return 4
    shortfall = cpu_shortfall(scale.resolved(config.max_batch))
    if shortfall and not options.ray_address:
        ray.shutdown()
        print(f"error: {shortfall}", file=sys.stderr)
        return 2
    if shortfall:  # a cluster may grow (Ray's autoscaler): the replicas wait for the CPUs
        print(f"warning: {shortfall}; the replicas wait until the cluster has them", file=sys.stderr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    proxied = options.ray_proxy or scale.ingress_replicas > 1
    try:
        if proxied:
            serve.start(http_options={"host": options.host, "port": options.port})
        else:
            serve.start(proxy_location="Disabled")  # the ingress listens on --port itself
        source = start_artifact_source(str(Path(options.artifact).resolve()), manifest)
        app = build_application(options.artifact, scale, config, limits(options), options.name, source,
                                listen=None if proxied else (options.host, options.port), access=access)
        started = time.perf_counter()
        serve.run(app, name=APP_NAME, route_prefix="/" if proxied else None)
        status = engine_status(APP_NAME)
        print(f"lmforge: {status['running']} replicas of {manifest['id']} behind http://{options.host}:"
              f"{options.port}/v1 (ready in {time.perf_counter() - started:.1f} s); `serve status` for details",
              file=sys.stderr, flush=True)
        stop.wait()
        print(f"lmforge: draining (up to {scale.drain_timeout_s:g} s)", file=sys.stderr, flush=True)
        serve.delete(APP_NAME)
        return 0
    except RuntimeError as exc:  # serve.run: a deployment failed (a replica that cannot verify its artifact)
        print(f"error: {str(exc).rstrip('.')}{failure_reason(engine_status(APP_NAME))}", file=sys.stderr)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
