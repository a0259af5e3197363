"""Scale-out on Ray Serve, on a local Ray cluster this module starts: two replicas answer through the OpenAI
client exactly as the single-process server does (errors included), prompts that share a prefix go to the
replica that cached it, one scrape shows every replica's metrics, a tampered artifact never serves, a node
without the artifact fetches it once, a killed replica costs only its own requests, and shutting down drains.

Bounded: one cluster for the module, small timeouts everywhere, about two minutes on 2 cores."""

import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import pytest
import yaml
from conftest import REPO, RunningServer

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'lmforge[ray]'")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from runtime import artifact as artifacts  # noqa: E402
from runtime import ray_serve  # noqa: E402
from runtime.errors import ArtifactError, BadInputError  # noqa: E402
from runtime.prefix_cache import BLOCK  # noqa: E402
from runtime.serve import API_KEY_ENV, Access, ApiKey, build_parser  # noqa: E402
from runtime.service import ServiceConfig  # noqa: E402

pytestmark = pytest.mark.ray

CONFIG = ServiceConfig(max_batch=4, max_context=256, prefill_chunk=16, prefix_cache_mb=1)
PROMPT = "the quick brown fox"
# The main application and the command line's need this key; clients here send it to every server (one that was
# started without a key ignores it).
KEY = "sk-ray-test-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(url: str, timeout: float = 30) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=timeout, trust_env=False,  # loopback only, never a proxy
                        headers={"authorization": f"Bearer {KEY}"})


def openai_client(url: str, timeout: float = 60):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=timeout,
                         http_client=httpx.Client(trust_env=False, timeout=timeout))


def wait_healthy(url: str, process, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            if http(url, timeout=5).get("/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no healthy answer from {url} within {timeout:g} s (exit code {process.poll()})")


def test_the_one_command_serves_two_replicas_and_stops_cleanly(chat_export, tmp_path):
    """`python -m runtime.serve ARTIFACT --replicas 2` as a user runs it: its own local Ray cluster, the ingress
    listening on --port, the openai client; SIGTERM drains and stops it. Runs before this module's cluster starts."""
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "runtime.serve", str(chat_export.path), "--replicas", "2",
                                "--threads", "1", "--port", str(port), "--name", "tiny", "--max-context", "256",
                                "--prefix-cache-mb", "1"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env=os.environ | {API_KEY_ENV: KEY})  # the key reaches the ingress, not argv
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout=120)
        assert len(http(url).get("/health").json()["replicas"]) == 2
        assert httpx.get(url + "/v1/models", trust_env=False).status_code == 401
        answer = openai_client(url).completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
        log.close()
    text = (tmp_path / "serve.log").read_text()
    assert code == 0 and "2 replicas of" in text and "draining" in text, text[-2000:]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with the environment the application recommends, and Serve on a loopback port."""
    saved = {key: os.environ.get(key) for key in ray_serve.cluster_env()}
    os.environ.update(ray_serve.cluster_env())
    # 4 logical CPUs on 2 cores: the main application's two replicas reserve 2, and the tampered and draining
    # applications one each beside it (Ray counts reservations, not load).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    url = f"http://127.0.0.1:{free_port()}"
    serve.start(http_options={"host": "127.0.0.1", "port": int(url.rsplit(":", 1)[1])})
    try:
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def app(cluster, chat_export):
    """The application: two engine replicas (one thread each) behind one OpenAI endpoint that needs KEY."""
    application = ray_serve.build_application(str(chat_export.path), ray_serve.ScaleOut(replicas=2, threads=1),
                                              CONFIG, name="tiny", access=Access(ApiKey(KEY)))
    serve.run(application, name="lmforge", route_prefix="/")
    yield cluster
    serve.delete("lmforge")


@pytest.fixture(scope="module")
def single(chat_export):
    running = RunningServer(chat_export, service_config=CONFIG)
    yield running
    running.stop()


def test_prefix_keys_name_whole_blocks_of_the_prompts_start():
    prompt = list(range(3, 3 + 3 * BLOCK + 5))
    keys = ray_serve.prefix_keys(prompt, limit=8)
    assert len(keys) == 3  # whole blocks only, as the replicas' prefix caches store them
    same_start = ray_serve.prefix_keys(prompt[:2 * BLOCK] + [99] * BLOCK, limit=8)
    assert same_start[:2] == keys[:2] and same_start[2] != keys[2]  # a key names the whole prefix to its end
    assert ray_serve.prefix_keys(prompt, limit=2) == keys[:2]
    assert ray_serve.prefix_keys(prompt[:BLOCK - 1], limit=8) == [] and ray_serve.prefix_keys("text", 8) == []


def test_scaling_defaults_follow_the_slots():
    scale = ray_serve.ScaleOut(replicas=2, max_replicas=6).resolved(max_batch=16)
    assert (scale.min_replicas, scale.max_replicas, scale.target_ongoing, scale.affinity_slack) == (2, 6, 8, 4)
    policy = ray_serve.autoscaling(scale, 16)
    assert policy["target_ongoing_requests"] == 8 and policy["initial_replicas"] == 2
    assert policy["target_ongoing_requests"] < ray_serve.replica_queue(16)  # reachable before a replica is full
    assert ray_serve.autoscaling(ray_serve.ScaleOut(replicas=3).resolved(16), 16) is None  # a fixed count
    with pytest.raises(BadInputError, match="max-replicas"):
        ray_serve.ScaleOut(min_replicas=4, max_replicas=2).validate()


def replicas(url: str) -> dict[str, dict]:
    return {r["replica"]: r for r in http(url).get("/health").json()["replicas"]}


def test_two_replicas_answer_through_openai_as_the_single_process_server_does(app, single):
    scaled, alone = openai_client(app), openai_client(single.url)
    for ask in (lambda c: c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0),
                lambda c: c.completions.create(model="tiny", prompt=[5, 6, 7, 8, 9], max_tokens=12, temperature=0,
                                               logprobs=2),
                lambda c: c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                    max_tokens=12, temperature=0)):
        a, b = ask(scaled), ask(alone)
        assert a.choices == b.choices
        assert (a.usage.prompt_tokens, a.usage.completion_tokens) == (b.usage.prompt_tokens, b.usage.completion_tokens)
    streamed = [chunk.choices[0].text for chunk in scaled.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)]
    assert "".join(streamed) == alone.completions.create(model="tiny", prompt=PROMPT, max_tokens=12,
                                                         temperature=0).choices[0].text
    assert http(app).get("/v1/models").json() == http(single.url).get("/v1/models").json()


@pytest.mark.parametrize("body", [
    b"{not json",
    json.dumps({"model": "gpt-4", "prompt": "x"}).encode(),
    json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 10**9}).encode(),
    json.dumps({"model": "tiny", "prompt": "fox " * 200, "max_tokens": 100}).encode(),  # past the slot's context
    json.dumps({"model": "tiny", "prompt": [500], "max_tokens": 4}).encode(),  # outside the vocabulary
], ids=["malformed", "unknown model", "huge max_tokens", "past the context", "token outside the vocabulary"])
def test_bad_requests_get_the_same_errors_as_from_the_single_process_server(app, single, body):
    headers = {"content-type": "application/json"}
    scaled = http(app).post("/v1/completions", content=body, headers=headers)
    alone = http(single.url).post("/v1/completions", content=body, headers=headers)
    assert 400 <= alone.status_code < 500
    assert (scaled.status_code, scaled.json()) == (alone.status_code, alone.json())


def test_prompts_sharing_a_prefix_go_to_the_replica_that_cached_it(app):
    client = openai_client(app)
    prefix = [(7 * i) % 100 + 3 for i in range(3 * BLOCK)]
    client.completions.create(model="tiny", prompt=prefix + [3], max_tokens=2)  # some replica caches 3 blocks
    cached = [client.completions.create(model="tiny", prompt=prefix + [4, 5, i + 6], max_tokens=2)
              .usage.prompt_tokens_details.cached_tokens for i in range(8)]
    # Sent at random, each would find the prefix with probability 1/2; all 8 by chance: 1 in 256.
    assert cached == [3 * BLOCK] * 8
    # Prompts that share nothing go to the least loaded replica, ties broken at random: both get some.
    before = {r: s["prefix_cache"]["query_tokens"] for r, s in replicas(app).items()}
    for i in range(12):
        client.completions.create(model="tiny", prompt=[i + 3] + [9] * 20, max_tokens=2)
    after = {r: s["prefix_cache"]["query_tokens"] for r, s in replicas(app).items()}
    assert all(after[r] > before[r] for r in after), (before, after)


def test_one_scrape_holds_every_replicas_metrics_and_health_sees_them_all(app):
    from prometheus_client.parser import text_string_to_metric_families

    client = openai_client(app)
    for i in range(6):
        client.completions.create(model="tiny", prompt=[i + 3, 4, 5], max_tokens=2)
    health = http(app).get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert len(health.json()["replicas"]) == 2 and all(r["ok"] for r in health.json()["replicas"])
    families = {f.name: f for f in text_string_to_metric_families(http(app).get("/metrics").text)}
    ttft = families["gen_ai_server_time_to_first_token_seconds"]
    assert {s.labels["replica"] for s in ttft.samples} == set(replicas(app))
    assert "lmforge_replica_lost_requests" in families


def test_the_application_needs_the_key_except_for_health(app):
    import openai

    anonymous = httpx.Client(base_url=app, timeout=30, trust_env=False)
    assert anonymous.get("/health").status_code == 200
    refused = anonymous.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert anonymous.get("/metrics").status_code == 401 and http(app).get("/metrics").status_code == 200
    wrong = openai.OpenAI(base_url=app + "/v1", api_key="sk-wrong", max_retries=0,
                          http_client=httpx.Client(trust_env=False))
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)


def tampered_copy(artifact, folder):
    shutil.copytree(artifact.path, folder)
    model = folder / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    return folder


def test_a_replica_whose_artifact_fails_verification_never_becomes_ready(cluster, chat_export, tmp_path):
    bad = tampered_copy(chat_export, tmp_path / "engine")
    application = ray_serve.build_application(str(bad), ray_serve.ScaleOut(replicas=1, threads=1), CONFIG,
                                              name="tiny")
    try:
        with pytest.raises(RuntimeError, match="EngineReplica"):
            serve.run(application, name="tampered", route_prefix="/tampered")
        status = ray_serve.engine_status("tampered")
        assert status["status"] == "DEPLOY_FAILED" and status["running"] == 0
        assert "will not serve" in status["message"] and "does not match its sha256" in status["message"]
        # The ingress is up and answers at once: no replica, and why.
        response = http(cluster, timeout=10).post("/tampered/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert response.status_code == 503 and "does not match its sha256" in response.json()["error"]["message"]
        assert http(cluster, timeout=10).get("/tampered/health").status_code == 503
    finally:
        serve.delete("tampered")


def test_a_node_without_the_path_fetches_the_artifact_once_and_verifies_it(cluster, chat_export, tmp_path,
                                                                          monkeypatch):
    manifest = chat_export.manifest
    source = ray_serve.start_artifact_source(str(chat_export.path), manifest)
    spec = ray_serve.ArtifactSpec(str(tmp_path / "not-on-this-node"), manifest, source, str(tmp_path / "cache"))
    landed = []
    real_land = ray_serve.land
    monkeypatch.setattr(ray_serve, "land", lambda *args: landed.append(args) or real_land(*args))
    with ThreadPoolExecutor(3) as pool:  # three replicas starting on one node at once
        found = list(pool.map(lambda _: ray_serve.node_artifact(spec), range(3)))
    assert len(landed) == 1 and len({a.path for a in found}) == 1
    assert artifacts.load(found[0].path, verify=True).id == chat_export.id
    text_only = ray_serve.node_artifact(spec, only=artifacts.TEXT_FILES)  # the ingress: the tokenizer alone
    assert not (text_only.path / "model.onnx").exists() and (text_only.path / "tokenizer.json").is_file()

    bad = tampered_copy(chat_export, tmp_path / "tampered")
    bad_source = ray_serve.start_artifact_source(str(bad), manifest)
    bad_spec = ray_serve.ArtifactSpec(str(tmp_path / "elsewhere"), manifest, bad_source, str(tmp_path / "cache2"))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        ray_serve.node_artifact(bad_spec)
    assert not [p for p in (tmp_path / "cache2").iterdir() if p.is_dir()]  # nothing damaged is kept
    with pytest.raises(ArtifactError, match="is not on node"):
        ray_serve.node_artifact(ray_serve.ArtifactSpec(str(tmp_path / "nowhere"), manifest))


def load_until(url: str, stop: float, index: int, outcomes: list) -> None:
    """Requests one after another until `stop`, half of them streamed; each outcome is 'ok' (every token it asked
    for), what came short, or its error."""
    client = openai_client(url, timeout=60)
    ask = {"model": "tiny", "prompt": f"{index} {PROMPT}", "max_tokens": 40 + 10 * index, "temperature": 0,
           "extra_body": {"ignore_eos": True}}
    while time.time() < stop:
        try:
            if index % 2:
                chunks = list(client.completions.create(stream=True, **ask))
                reason = chunks[-1].choices[0].finish_reason  # in a chunk of its own, after the tokens'
                tokens = sum(1 for chunk in chunks if chunk.choices[0].finish_reason is None)
            else:
                answer = client.completions.create(**ask)
                reason, tokens = answer.choices[0].finish_reason, answer.usage.completion_tokens
            outcomes.append("ok" if (reason, tokens) == ("length", ask["max_tokens"]) else (reason, tokens))
        except Exception as exc:  # the test sorts them out
            outcomes.append(exc)


def active_slots(url: str) -> dict[str, float]:
    """Sequences each replica holds a KV slot for, from the one metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.labels["replica"]: sample.value for family in text_string_to_metric_families(
        http(url).get("/metrics").text) if family.name == "lmforge_slots_active" for sample in family.samples}


@pytest.fixture
def slow_pair(cluster, chat_export):
    """Two slow replicas of their own (the main application's are fast: a scrape that saw one hold requests
    could be followed by a kill that found them finished, and CI once killed a replica that held nothing live)."""
    yield serve_slow(chat_export, ray_serve.ScaleOut(replicas=2, threads=1), "killed")
    serve.delete("killed")


def test_killing_a_replica_mid_load_costs_only_its_own_requests(slow_pair):
    from prometheus_client.parser import text_string_to_metric_families

    app = slow_pair  # the rest reads as the main application's tests do
    victim, survivor = list(replicas(app).items())
    outcomes: list = []
    stop = time.time() + 10
    clients = [threading.Thread(target=load_until, args=(app, stop, i, outcomes)) for i in range(8)]
    for thread in clients:
        thread.start()
    # Each request runs 2-6 s here: once the victim holds some, half a second later they are streaming tokens.
    deadline = time.time() + 5
    while time.time() < deadline and not active_slots(app).get(victim[0]):
        time.sleep(0.1)
    assert active_slots(app).get(victim[0]), "no request reached the victim"
    time.sleep(0.5)
    os.kill(victim[1]["pid"], signal.SIGKILL)
    for thread in clients:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in clients), "a request hung"
    failures = [o for o in outcomes if o != "ok"]
    assert outcomes.count("ok") > len(failures)
    for failure in failures:  # a clear 5xx, or the error event of a stream that had started
        assert "failed while serving this request" in str(failure), failure
        assert getattr(failure, "status_code", None) in (None, 500), failure
    lost = {sample.labels["outcome"]: sample.value for family in text_string_to_metric_families(
        http(app).get("/metrics").text) if family.name == "lmforge_replica_lost_requests" for sample in family.samples}
    assert lost["failed"] == len(failures)
    assert lost["failed"] >= 1  # what it held had streamed tokens: ended with a clear error, never silently lost
    # The survivor kept serving, and Serve starts a replacement.
    assert openai_client(app).completions.create(model="tiny", prompt=PROMPT, max_tokens=4).choices
    deadline = time.time() + 90
    while time.time() < deadline and http(app).get("/health").status_code != 200:
        time.sleep(1)
    now = replicas(app)
    assert len(now) == 2 and victim[0] not in now and survivor[0] in now


def slow_replica_class():
    """EngineReplica with every engine step 50 ms longer: requests still running when a test acts on them.
    Made inside a function so that Ray ships the class by value (workers cannot import this test module)."""

    class SlowEngineReplica(ray_serve.EngineReplica):
        def __init__(self, *args):
            super().__init__(*args)
            run = self.service.session.run_slots

            def slow_run(*run_args, **run_kwargs):
                time.sleep(0.05)
                return run(*run_args, **run_kwargs)

            self.service.session.run_slots = slow_run

    return SlowEngineReplica


def serve_slow(chat_export, scale: ray_serve.ScaleOut, name: str, config: ServiceConfig = CONFIG) -> str:
    """An application of slow replicas under `name` that listens itself, as the command line's ingress does (the
    main application: behind Serve's proxy); its URL."""
    port = free_port()
    serve.run(ray_serve.build_application(str(chat_export.path), scale, config, name="tiny",
                                          replica_class=slow_replica_class(), listen=("127.0.0.1", port)),
              name=name, route_prefix=None)
    return f"http://127.0.0.1:{port}"


def test_autoscaling_adds_a_replica_when_ongoing_requests_pass_the_target(cluster, chat_export):
    scale = ray_serve.ScaleOut(replicas=1, max_replicas=2, threads=1, target_ongoing=1)
    url = serve_slow(chat_export, scale, "autoscaled")
    try:
        assert ray_serve.engine_status("autoscaled")["running"] == 1
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 240, "ignore_eos": True}
        with ThreadPoolExecutor(4) as pool:  # 4 ongoing against a target of 1, for ~12 s
            running = [pool.submit(http(url, timeout=60).post, "/v1/completions", json=body) for _ in range(4)]
            deadline = time.time() + 40  # Ray's upscale delay is 10 s here, plus its metrics' period
            while time.time() < deadline and ray_serve.engine_status("autoscaled")["running"] < 2:
                time.sleep(1)
            assert ray_serve.engine_status("autoscaled")["running"] == 2
            assert all(f.result(timeout=60).status_code == 200 for f in running)
    finally:
        serve.delete("autoscaled")


DRAIN_S = 6


@pytest.fixture(scope="module")
def slow_app(cluster, chat_export):
    scale = ray_serve.ScaleOut(replicas=1, threads=1, drain_timeout_s=DRAIN_S)
    config = replace(CONFIG, queue_size=1)  # room for 4 slots + 1 at the replica + 1 queued: 6 requests
    yield serve_slow(chat_export, scale, "slow", config)
    if "slow" in serve.status().applications:
        serve.delete("slow")


def test_a_client_that_disconnects_cancels_its_request_on_the_replica(slow_app):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with http(slow_app).stream("POST", "/v1/completions", json=body) as response:
        next(line for line in response.iter_lines() if line)
    deadline = time.time() + 15
    while time.time() < deadline and 'outcome="cancelled"' not in http(slow_app).get("/metrics").text:
        time.sleep(0.2)
    assert 'lmforge_requests_total{outcome="cancelled"' in http(slow_app).get("/metrics").text


def test_more_requests_than_the_replicas_hold_get_429(slow_app):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 20, "ignore_eos": True}
    with ThreadPoolExecutor(9) as pool:  # each takes ~1 s on the slow replica: all 9 are there at once
        responses = list(pool.map(lambda _: http(slow_app).post("/v1/completions", json=body), range(9)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 6 + [429] * 3, statuses
    assert {r.json()["error"]["type"] for r in responses if r.status_code == 429} == {"rate_limit_error"}


def test_shutdown_drains_running_requests_up_to_the_deadline(slow_app):
    client = openai_client(slow_app)

    def stream(max_tokens: int):
        chunks = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        try:
            return [chunk.choices[0].finish_reason for chunk in chunks][-1]
        except Exception as exc:  # the stream's error event
            return exc

    with ThreadPoolExecutor(3) as pool:
        short = [pool.submit(stream, 40) for _ in range(2)]  # ~2 s each: they finish inside the deadline
        long = pool.submit(stream, 240)  # ~12 s: cut at the deadline
        time.sleep(1)
        started = time.time()
        serve.delete("slow")  # returns once the application is gone
        took = time.time() - started
        assert [f.result(timeout=30) for f in short] == ["length", "length"]
        cut = long.result(timeout=30)
    assert isinstance(cut, Exception) and "failed while serving" in str(cut), cut  # ended, and said why
    assert 1 < took < DRAIN_S + 20, took
    with pytest.raises(httpx.TransportError):  # the listener is gone with its application
        http(slow_app, timeout=10).post("/v1/completions", json={"model": "tiny"})


def test_the_kuberay_manifest_runs_this_application_from_the_image_and_the_volume():
    manifest = yaml.safe_load((REPO / "deploy" / "rayservice.yaml").read_text())
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    cluster = manifest["spec"]["rayClusterConfig"]
    base_version = re.search(r"^FROM rayproject/ray:([\d.]+)-py", dockerfile, re.M).group(1)
    image = re.search(r"docker build -f deploy/Dockerfile -t (\S+) \.", dockerfile).group(1)
    assert cluster["rayVersion"] == base_version  # KubeRay's idea of the version is the image's

    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    application = serve_config["applications"][0]
    module, _, attribute = application["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute)) and attribute == "app_builder"
    options = build_parser().parse_args(ray_serve.builder_argv(application["args"]))
    assert options.replicas >= 1 and options.max_replicas >= options.replicas

    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                              for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            assert container["image"] == image
            assert {e["name"]: e["value"] for e in container["env"] if "value" in e} == ray_serve.cluster_env()
            secret = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "LMFORGE_API_KEY"]
            assert secret and secret[0]["name"] and secret[0]["key"]  # the key comes from a Secret, never inline
            mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims]
            assert any(options.artifact.startswith(mount.rstrip("/") + "/") for mount in mounts), container["name"]
    head_ports = {p["name"]: p["containerPort"] for p in pods[0]["containers"][0]["ports"]}
    assert head_ports["serve"] == serve_config["http_options"]["port"]
