"""The Ray Serve LLM adapter on real Ray Serve 2.60 with real vLLM CPU engines.

One Ray start-up for the file: two gangs (DP groups) of DP=2 with EP, tiny MoE,
behind Ray Serve LLM's OpenAI ingress, built with ``build_elastic_dp_openai_app``.
Clients never retry here: any failed request is a client error. In order:

1. SIGKILL of rank 1's worker in gang A under load: gang A fences and heals in
   place (its rank 0 keeps its engine and serves again), the dead rank's replica
   forwards what reaches it, then starts a new engine and rejoins: gang A is back
   to two ranks and vLLM's expert layout, and Ray restarted nothing.
2. Gang A's rank 0 worker killed while 32 requests run (streams, chat and
   completions): rank 0 heals in place like any other rank, its streams continue
   elsewhere with the no-fault text, and it rejoins.
3. A rank lost while idle: the gang heals, is not restarted past its rebuild budget,
   rejoins, and serves.
4. An unrecoverable state (both of gang A's workers killed at once): Ray restarts gang
   A (new gang id), gang B serves meanwhile; no client error.
5. Rank 0's replica process killed mid-stream (the gang's store and DP coordinator die
   with it): Ray restarts the gang, and the ingress finishes every request elsewhere
   with the no-fault text.
"""

import json
import threading
import time

import pytest

pytest.importorskip("ray.serve.llm")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.llm import LLMConfig  # noqa: E402

from vllm_elastic_ft import faults  # noqa: E402
from vllm_elastic_ft.comm import keys  # noqa: E402
from vllm_elastic_ft.comm.store import connect_store  # noqa: E402
from vllm_elastic_ft.group.fencing import current_epoch  # noqa: E402
from vllm_elastic_ft.loadgen import run_load  # noqa: E402
from vllm_elastic_ft.ray_serve import build_elastic_dp_openai_app  # noqa: E402
from vllm_elastic_ft.ray_serve.drill import (  # noqa: E402
    ENV, PROMPTS, URL, completed, gang_stores, serves,
)
from vllm_elastic_ft.watchdog.attribution import RankStatus  # noqa: E402

pytestmark = pytest.mark.e2e

def _worker_pid(address: str, rank: int, epoch: int = 0) -> int:
    store = connect_store(address)
    return RankStatus.decode(store.get(keys.heartbeat("dp", epoch, rank))).pid


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def two_gangs(tiny_moe_path):
    ray.init(num_cpus=16, runtime_env={"env_vars": ENV}, include_dashboard=False)
    config = LLMConfig(
        model_loading_config={"model_id": "tiny-moe", "model_source": tiny_moe_path},
        accelerator_config={"kind": "cpu"},
        engine_kwargs=dict(dtype="float32", enforce_eager=True, max_model_len=512,
                           max_num_seqs=16, seed=0, data_parallel_size=2,
                           enable_expert_parallel=True,
                           additional_config={"elastic_ft": {"deadline_s": 2.0,
                                                             "rebuild_budget_s": 20.0}}),
        runtime_env={"env_vars": ENV},
        deployment_config={"num_replicas": 2, "health_check_period_s": 2.0,
                           "health_check_timeout_s": 10.0},
    )
    try:
        serve.run(build_elastic_dp_openai_app(config), blocking=False)
        _wait(lambda: len(gang_stores()) == 2, 600, "two gangs to register their stores")
        # Gangs come up one after the other: probe until each has served a request.
        stores = [connect_store(a) for a in gang_stores().values()]
        _wait(lambda: serves() and all(completed(s) > 0 for s in stores), 900,
              "both gangs to serve")
        yield config
    finally:
        serve.shutdown()
        ray.shutdown()


def _load(results: list, requests: int) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(run_load(
        URL, PROMPTS, requests, 4, max_tokens=24, timeout_s=120, progress_every_s=None,
        retry_for_s=0)), daemon=True)
    thread.start()
    return thread


def test_a_killed_rank_heals_in_place_and_clients_see_no_error(two_gangs):
    gangs = gang_stores()
    gang_a, store_a = sorted(gangs.items())[0]
    victim = _worker_pid(store_a, 1)
    results: list = []
    load = _load(results, 40)
    time.sleep(3)
    faults.signal_process("kill", victim, 1)
    store = connect_store(store_a)
    _wait(lambda: store.check([keys.serving("dp", 1)]), 60, "gang A to serve again at epoch 1")
    members = json.loads(store.get(keys.members("dp", 1)))
    assert members["members"] == [0]
    assert sorted(members["placement"]["0"]) == list(range(8))
    load.join(timeout=300)
    summary = results[0]
    assert summary.failed == 0 and summary.ok == 40, [r.error for r in summary.records if not r.ok]
    # Healed in place, not restarted: the same two gangs are registered.
    assert set(gang_stores()) == set(gangs)
    _assert_back_to_full_width(store, survivor_pids={0: _worker_pid(store_a, 0, epoch=1)})
    assert set(gang_stores()) == set(gangs), "rejoined in place, not restarted"
    after: list = []
    _load(after, 12).join(timeout=300)
    assert after[0].failed == 0


def _assert_back_to_full_width(store, survivor_pids: dict[int, int], world: int = 2,
                               timeout_s: float = 400.0) -> int:
    """The gang rejoined its lost rank in place: a later epoch serves with every rank and
    vLLM's expert layout (8 experts, rank r holds 4r..4r+3), the survivors are the same
    processes. Returns that epoch."""
    def whole():
        epoch = current_epoch(store, "dp")
        if not store.check([keys.members("dp", epoch), keys.serving("dp", epoch)]):
            return None
        members = json.loads(store.get(keys.members("dp", epoch)))
        return (epoch, members) if members["members"] == list(range(world)) else None

    epoch, members = _wait(whole, timeout_s, "the gang to rejoin its lost rank")
    assert {int(r): sorted(e) for r, e in members["placement"].items()} == \
        {r: list(range(4 * r, 4 * r + 4)) for r in range(world)}, members["placement"]
    for rank, pid in survivor_pids.items():
        assert _worker_pid_at(store, rank, epoch) == pid, f"rank {rank} is the same process"
    return epoch


def _worker_pid_at(store, rank: int, epoch: int) -> int:
    """The worker pid of stable rank ``rank`` at ``epoch`` (heartbeats are keyed by the
    epoch's group rank: the rank's index in that epoch's members)."""
    members = json.loads(store.get(keys.members("dp", epoch)))["members"]
    beat = store.get(keys.heartbeat("dp", epoch, members.index(rank)))
    return RankStatus.decode(beat).pid


def _a_whole_gang(timeout_s: float = 600.0) -> tuple[str, str]:
    """A gang at epoch 0 whose two ranks both heartbeat: its id and store address. Ray's KV
    keeps the store address of a gang Ray restarted (its store does not answer: skipped),
    and a gang Ray just built may still be starting (no heartbeats yet: waited for)."""
    from vllm_elastic_ft.group.fencing import current_epoch

    def whole():
        for gang, address in sorted(gang_stores().items()):
            try:
                store = connect_store(address, timeout_s=2.0)
                beats = [keys.heartbeat("dp", 0, r) for r in (0, 1)]
                if current_epoch(store, "dp") == 0 and store.check(beats):
                    return gang, address
            except Exception:  # noqa: BLE001 - a restarted gang's store is gone
                continue
        return None

    gang, address = _wait(whole, timeout_s, "a gang with both ranks up at epoch 0")
    # Heartbeats come before Serve calls the replicas started (a gang Ray just rebuilt gets
    # no traffic until then): probe until this gang has served requests itself.
    store = connect_store(address)
    _wait(lambda: serves() and completed(store) > 0, timeout_s, f"gang {gang} to serve")
    return gang, address


def test_a_gang_that_healed_while_idle_is_not_restarted_after_its_budget(two_gangs):
    """Issue 11: a rank lost while no request runs heals in place, and the healed gang stays
    up past rebuild_budget_s + 3 health periods with no traffic (READY must not age into a
    Ray gang restart): the same gangs, the same survivor process, and it serves."""
    gangs = gang_stores()
    gang, address = _a_whole_gang()
    survivor, victim = _worker_pid(address, 0), _worker_pid(address, 1)
    faults.signal_process("kill", victim, 1)
    store = connect_store(address)
    _wait(lambda: store.check([keys.serving("dp", 1)]), 60, "the idle gang to heal in place")
    budget_s = two_gangs.engine_kwargs["additional_config"]["elastic_ft"]["rebuild_budget_s"]
    period_s = two_gangs.deployment_config["health_check_period_s"]
    time.sleep(budget_s + 3 * period_s + 4)  # no traffic at all meanwhile
    assert set(gang_stores()) == set(gangs), "Ray restarted a gang that had healed"
    _assert_back_to_full_width(store, survivor_pids={0: survivor})
    assert set(gang_stores()) == set(gangs), "rejoined in place, not restarted"
    after: list = []
    _load(after, 8).join(timeout=300)
    assert after[0].failed == 0 and after[0].ok == 8


def _openai_text(client, kind: str, prompt: str, stream: bool, max_tokens: int,
                 progress: list | None = None) -> str:
    """One greedy request through the official OpenAI client (no retries: max_retries=0)."""
    common = dict(model="tiny-moe", max_tokens=max_tokens, temperature=0.0, stream=stream,
                  extra_body={"ignore_eos": True})
    if kind == "chat":
        answer = client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], **common)
        pieces = (c.choices[0].delta.content or "" for c in answer if c.choices) if stream \
            else [answer.choices[0].message.content]
    else:
        answer = client.completions.create(prompt=prompt, **common)
        pieces = (c.choices[0].text for c in answer if c.choices) if stream \
            else [answer.choices[0].text]
    text = ""
    for piece in pieces:
        text += piece
        if progress is not None:
            progress.append(1)
    return text


def _counter(store, key: str) -> int:
    return int(store.get(key)) if store.check([key]) else 0


#: Mid-stream: chat and completions, streaming and plain. 24 streams over the app's four
#: replicas put streams on the victim's replica except with probability (3/4)^24 < 0.1%.
_MID_STREAM_KINDS = [("completions", True), ("chat", True), ("completions", False),
                     ("chat", True), ("completions", True), ("chat", False),
                     ("completions", True), ("chat", True)]


def _mid_stream_kill(kill) -> tuple[dict, dict, dict]:
    """32 greedy requests through the OpenAI client (max_retries=0; 24 streams, chat and
    completions), ``kill()`` once every stream is under way. Returns the texts, the client
    errors (every exception: nothing retries) and the no-fault texts, by request."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0, timeout=300)
    cases = [(*_MID_STREAM_KINDS[i % 8], f"{PROMPTS[i % len(PROMPTS)]} {i}") for i in range(32)]
    with ThreadPoolExecutor(8) as pool:  # the no-fault texts (greedy: batching does not matter)
        reference = dict(enumerate(pool.map(
            lambda case: _openai_text(client, case[0], case[2], False, 160), cases)))
    texts, errors = {}, {}
    progress = {i: [] for i, case in enumerate(cases) if case[1]}

    def run(i: int) -> None:
        kind, stream, prompt = cases[i]
        try:
            texts[i] = _openai_text(client, kind, prompt, stream, 160, progress.get(i))
        except Exception as err:  # every exception is a client error: nothing retries
            errors[i] = repr(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    _wait(lambda: all(len(p) >= 3 for p in progress.values()), 120,
          "every stream to be under way")
    kill()
    for t in threads:
        t.join(timeout=600)
    return texts, errors, reference


def test_requests_on_a_lost_rank_0_finish_elsewhere_with_the_reference_text(two_gangs):
    """Issue 11: a whole gang's rank 0 worker is killed while 32 requests run (24 of them
    streams, chat and completions, every stream mid-way). Rank 0 heals in place like any other
    rank (its replica, which hosts the gang's store and vLLM's DP coordinator, stays up); its
    streams continue on a serving replica after the tokens their clients have, its plain
    requests are sent again whole; every text equals the no-fault greedy text and the client
    (OpenAI's, max_retries=0) sees no error."""
    gangs = gang_stores()
    gang, address = sorted(gangs.items())[0]  # gang A, whole again since it rejoined
    store = connect_store(address)
    epoch = current_epoch(store, "dp")
    continued_before = _counter(store, keys.serve_continued(0))
    survivor, victim = _worker_pid_at(store, 1, epoch), _worker_pid_at(store, 0, epoch)
    texts, errors, reference = _mid_stream_kill(lambda: faults.signal_process("kill", victim, 0))
    assert not errors, errors
    assert texts == reference, {i: (texts.get(i), reference[i]) for i in reference
                                if texts.get(i) != reference[i]}
    store = connect_store(address)
    healed = epoch + 1
    assert store.check([keys.serving("dp", healed)]), "rank 0's gang healed in place"
    assert json.loads(store.get(keys.members("dp", healed)))["members"] == [1]
    assert _counter(store, keys.serve_continued(0)) > continued_before, \
        "no stream was running on the lost rank: the case did not happen"
    assert set(gang_stores()) == set(gangs), "healed in place, not restarted"
    _assert_back_to_full_width(store, survivor_pids={1: survivor})
    assert set(gang_stores()) == set(gangs), "rank 0 rejoined in place, not restarted"


def test_an_unrecoverable_gang_is_restarted_by_ray_while_the_other_serves(two_gangs):
    gangs = gang_stores()
    gang_a, store_a = sorted(gangs.items())[0]
    store = connect_store(store_a)
    epoch = current_epoch(store, "dp")
    workers = [_worker_pid_at(store, r, epoch) for r in (0, 1)]
    results: list = []
    load = _load(results, 40)
    time.sleep(2)
    for rank, pid in enumerate(workers):  # no survivor: nothing can heal in place
        faults.signal_process("kill", pid, rank)
    # Ray replaces gang A (a new gang id registers its store); gang B serves meanwhile.
    _wait(lambda: len(set(gang_stores()) - set(gangs)) == 1, 900, "Ray to restart gang A")
    load.join(timeout=900)
    summary = results[0]
    assert summary.failed == 0 and summary.ok == 40, [r.error for r in summary.records if not r.ok]
    _wait(serves, 300, "the app to serve after the restart")


def test_requests_on_a_dead_replica_process_finish_elsewhere_with_the_reference_text(two_gangs):
    """Issue 11: rank 0's replica *process* dies (SIGKILL: it hosts the gang's store and vLLM's
    DP coordinator, so the gang cannot heal) while 32 requests run, 24 of them streams. Ray
    restarts the gang; the ingress sends each request that had no answer yet to another
    replica and continues each stream under way there: the OpenAI client (max_retries=0)
    sees no error and every text equals the no-fault greedy text."""
    import psutil

    gangs = gang_stores()
    gang, address = _a_whole_gang()
    engine = psutil.Process(_worker_pid(address, 0)).parent()
    replica = engine.parent()  # rank 0's Ray Serve replica: its engine's parent
    assert "ServeReplica" in " ".join(replica.cmdline()) or "ServeReplica" in replica.name(), \
        (replica.name(), replica.cmdline()[:3])
    ingress = serve.get_deployment_handle("ElasticOpenAiIngress", "default")
    before = ingress.elastic_ft_counts.remote().result()
    texts, errors, reference = _mid_stream_kill(replica.kill)
    assert not errors, errors
    assert texts == reference, {i: (texts.get(i), reference[i]) for i in reference
                                if texts.get(i) != reference[i]}
    after = ingress.elastic_ft_counts.remote().result()
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in ("resent", "continued", "gave_up")}
    assert moved["resent"] + moved["continued"] > 0, \
        f"no request was running on the dead replica: the case did not happen ({moved})"
    assert moved["gave_up"] == 0, moved
    _wait(lambda: len(set(gang_stores()) - set(gangs)) >= 1, 600, "Ray to restart the gang")
    _wait(serves, 300, "the app to serve after the restart")
