"""Unit tests of the in-engine recovery pieces that need no vLLM process.

* ``group/epochs.advance``: survivors reach one membership and one placement,
  in a real TCPStore, whoever arrives first; a late (stale) rank is refused.
* ``worker_group._insert_dead_rows``: the logical-N layout of a dispatch result.
* ``frontend_recovery``: the continuation of a stranded request, and dropping a
  lost engine's late outputs (with small stand-ins for vLLM's request objects);
  what becomes of a stranded request whose client waits on vLLM's real output
  processor (re-submitted, or ended at once when it cannot be).
* ``expert_loader``: finding an expert's weights in a real checkpoint.
"""

import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.group import epochs
from vllm_elastic_ft.group.fencing import FencedError, current_epoch


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=10))


def _at_once(calls):
    """Run ``{rank: fn}`` on one thread each; ``(results, errors)`` by rank."""
    results, errors = {}, {}

    def run(rank, fn):
        try:
            results[rank] = fn()
        except Exception as err:  # collected and asserted on below
            errors[rank] = err

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def _advance_all(store, old, ranks, suspects, window_s=2.0):
    return _at_once({r: (lambda r=r: epochs.advance(store, "dp", old, r, suspects, 8, window_s,
                                                     10)) for r in ranks})


def test_survivors_agree_on_members_and_placement(store):
    old = epochs.initial(4, 8)
    results, errors = _advance_all(store, old, [0, 2, 3], {1})
    assert not errors
    assert {m.members for m in results.values()} == {(0, 2, 3)}
    assert {m.epoch for m in results.values()} == {1} and current_epoch(store, "dp") == 1
    placement = results[0].placement
    assert all(m.placement == placement for m in results.values())
    assert sorted(e for experts in placement.values() for e in experts) == list(range(8))
    # Survivors keep what they held; only rank 1's experts moved.
    for rank in (0, 2, 3):
        assert set(old.placement[rank]) <= set(placement[rank])
    assert epochs.published(store, "dp", 1) == results[0]


def test_unreported_dead_rank_is_left_out_after_the_join_window(store):
    old = epochs.initial(3, 8)
    results, errors = _advance_all(store, old, [0, 1], set(), window_s=0.3)
    assert not errors and {m.members for m in results.values()} == {(0, 1)}


def test_a_rank_that_arrives_after_the_members_are_published_is_refused(store):
    old = epochs.initial(2, 8)
    _advance_all(store, old, [0], {1})
    with pytest.raises(FencedError):
        epochs.advance(store, "dp", old, 1, set(), 8, 0.1, 5)


def test_a_rank_two_epochs_behind_builds_on_the_latest_placement(store):
    old = epochs.initial(4, 8)
    first, _ = _advance_all(store, old, [0, 1, 2], {3})
    second, _ = _advance_all(store, first[0], [0, 1], {2})
    assert second[0].members == (0, 1)
    assert sorted(e for v in second[0].placement.values() for e in v) == list(range(8))


def test_reported_suspects_are_stable_ids_of_this_epochs_reports():
    old = epochs.ms.Membership(3, (0, 2, 3), {}, 0)  # group ranks 0, 1, 2 are ids 0, 2, 3
    reports = [SimpleNamespace(epoch=2, suspects=[0]), SimpleNamespace(epoch=3, suspects=[1])]
    assert epochs.reported_suspects(lambda: reports, old, lambda: False, 0.0) == {2}
    # No report yet and the group already moved on: no waiting.
    started = time.monotonic()
    assert epochs.reported_suspects(lambda: [], old, lambda: True, 5.0) == set()
    assert time.monotonic() - started < 1.0


def test_a_join_request_read_while_it_is_deleted_is_either_there_or_not(store):
    # The admitting epoch's leader deletes the request while other ranks may
    # be reading it; a check-then-get read here returned b"" (measured).
    writer = dist.TCPStore("127.0.0.1", store.port, is_master=False, wait_for_workers=False,
                           timeout=timedelta(seconds=5))
    seen, errors, done = set(), [], threading.Event()

    def read():
        while not done.is_set():
            try:
                seen.add(epochs.ms.pending_join(store, "dp"))
            except Exception as err:  # noqa: BLE001 - the test reports it
                errors.append(err)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(500):
            epochs.ms.request_join(writer, "dp", 3)
            writer.delete_key(keys.join_request("dp"))
    finally:
        done.set()
        reader.join()
    assert not errors and seen <= {None, 3} and None in seen, (errors, seen)
    assert epochs.ms.pending_join(store, "dp") is None


def _admit_all(store, members, joiner, step=7, window_s=2.0, joiner_experts=(2, 3)):
    """Every member (with its membership) and the joiner (with its experts) admit at once."""
    calls = {r: (lambda r=r, m=m: epochs.admit(store, "dp", m, r, joiner, "t1", None, step,
                                                window_s, 10)) for r, m in members.items()}
    calls[joiner] = lambda: epochs.admit(store, "dp", None, joiner, joiner, "t1", joiner_experts,
                                         -1, window_s, 10)
    return _at_once(calls)


def test_a_replacement_rank_is_admitted_with_the_experts_it_brought(store):
    shrunk, _ = _advance_all(store, epochs.initial(4, 8), [0, 2, 3], {1})
    assert 1 not in shrunk[0].members
    results, errors = _admit_all(store, shrunk, joiner=1)
    assert not errors, errors
    assert {m.members for m in results.values()} == {(0, 1, 2, 3)}
    assert {m.epoch for m in results.values()} == {2} and current_epoch(store, "dp") == 2
    placement = results[1].placement
    assert all(m.placement == placement for m in results.values())
    # Back to vLLM's layout: the joiner computes what it loaded, nobody else does.
    assert placement == {0: (0, 1), 1: (2, 3), 2: (4, 5), 3: (6, 7)}
    # The joiner adopts the members' step number (the batch all-reduce checks it).
    assert int(store.get(keys.admission_step("dp", 2, 0))) == 7


def test_an_idle_member_waits_for_its_admit_call_instead_of_recovering(store):
    """An admission's fence is marked before it happens; an idle member that sees the
    new epoch first does not treat it as a fault (it would fence a second time)."""
    from vllm_elastic_ft.group.member import GroupMember
    from vllm_elastic_ft.vllm.worker_group import GROUP_NAME

    shrunk, _ = _advance_all(store, epochs.initial(4, 8), [0, 2, 3], {1})  # epoch 1
    group = GroupMember.__new__(GroupMember)
    group.store, group.members, group.group = store, shrunk[3], GROUP_NAME
    named = []
    group.watchdog = SimpleNamespace(group_epoch=1, peer_named=lambda: bool(named))
    assert GROUP_NAME == "dp" and not group._admission_coming()
    # Rank 0's admit call came first: it marked epoch 2 and fenced.
    first = threading.Thread(target=lambda: epochs.admit(
        store, "dp", shrunk[0], 0, 1, "t3", None, 5, 0.3, 10))
    first.start()
    while current_epoch(store, "dp") < 2:
        time.sleep(0.005)
    group.watchdog.group_epoch = 2
    assert epochs.is_admission(store, "dp", 2) and group._admission_coming()
    named.append(1)  # ... but a peer named dead is a fault all the same
    assert not group._admission_coming()
    first.join()
    # A fault's fence is not an admission's.
    epochs.advance(store, "dp", epochs.published(store, "dp", 2), 0, set(), 8, 0.1, 10)
    assert current_epoch(store, "dp") == 3 and not epochs.is_admission(store, "dp", 3)


def test_a_replacement_that_never_registers_leaves_the_group_as_it_was(store):
    shrunk, _ = _advance_all(store, epochs.initial(4, 8), [0, 2, 3], {1})
    results, errors = _at_once({r: (lambda r=r: epochs.admit(store, "dp", shrunk[r], r, 1, "t2",
                                                              None, 3, 0.3, 10))
                                for r in (0, 2, 3)})
    assert not errors, errors
    assert {m.members for m in results.values()} == {(0, 2, 3)}
    assert results[0].placement == shrunk[0].placement


def test_admission_placement_moves_the_joiners_experts_back():
    from vllm_elastic_ft.placement.solver import admit

    current = {0: (0, 1, 2, 3), 2: (4, 5), 3: (6, 7)}
    assert admit(current, [0, 1, 2, 3], 1, (2, 3)) == {0: (0, 1), 1: (2, 3), 2: (4, 5),
                                                       3: (6, 7)}
    assert admit(current, [0, 2, 3], 1, (2, 3)) == current


def test_a_joining_worker_runs_its_collectives_alone():
    """Before admission a replacement worker's warm-up steps touch no peer: the other
    ranks count 0 tokens, dispatch pads their rows with zeros, combine keeps its own."""
    from vllm_elastic_ft.group.member import GroupMember
    from vllm_elastic_ft.vllm.worker_group import WorkerGroup

    group = WorkerGroup.__new__(WorkerGroup)
    group.id, group.world = 1, 3
    group.member = GroupMember.__new__(GroupMember)
    group.member.members = epochs.ms.Membership(-1, (1,), {}, -1)  # joining: no epoch yet
    group.member.step = 0
    group._redo_step, group.last_column = False, None
    counts = group.all_reduce_batch([5, 8, 0, 1])
    assert counts.tolist() == [[0, 5, 0], [0, 8, 0], [0, 0, 0], [0, 1, 0]]
    rows = torch.ones(2, 4)
    gathered = group.all_gatherv([rows], [3, 2, 1])
    assert gathered[0].shape == (6, 4) and gathered[0][3:5].eq(1).all()
    assert gathered[0][:3].eq(0).all() and gathered[0][5:].eq(0).all()
    combined = group.reduce_scatterv(torch.arange(6.0).unsqueeze(1), [3, 2, 1])
    assert combined.flatten().tolist() == [3.0, 4.0]


def _batch_sync_against(peer_step: int, my_step: int = 272):
    """A live worker's batch all-reduce where the other member (rank 1) is at
    ``peer_step``: the transport's sum is played by adding that peer's column."""
    from vllm_elastic_ft.group.member import GroupMember
    from vllm_elastic_ft.vllm import worker_group as wg

    group = wg.WorkerGroup.__new__(wg.WorkerGroup)
    group.id, group.world = 0, 2
    member = GroupMember.__new__(GroupMember)
    member.id, member.members, member.step = 0, epochs.ms.Membership(1, (0, 1), {}, -1), my_step
    member.run_step = lambda attempt: attempt(True)
    member.served = lambda: None
    failures = []

    def fail(reason):
        failures.append(reason)
        raise wg.GroupFailedError(reason)

    member.fail = fail
    group.member, group.watchdog, group.transport = member, None, None
    group._redo_step, group.last_column = False, [3]

    def peer_sum(_watchdog, _transport, tensor):
        tensor[0, 1], tensor[1, 1] = 4, peer_step

    return group, peer_sum, failures


def test_a_survivor_that_finished_the_interrupted_step_is_not_a_failure(monkeypatch):
    """After a rebuild one survivor may redo step n while its peer had finished it and is at
    n + 1 (seen across two nodes: steps [272, 273]). Each column is the size of the
    forward each runs next, so the sync goes through and the laggard counts on from n + 1."""
    from vllm_elastic_ft.vllm import worker_group as wg

    group, peer_sum, failures = _batch_sync_against(peer_step=273)
    monkeypatch.setattr(wg, "guarded_all_reduce", peer_sum)
    counts = group.all_reduce_batch((), retry=True)
    assert counts.tolist() == [[3, 4]] and not failures
    assert group.member.step == 273
    group, peer_sum, failures = _batch_sync_against(peer_step=275)
    monkeypatch.setattr(wg, "guarded_all_reduce", peer_sum)
    with pytest.raises(wg.GroupFailedError, match="more than one step apart"):
        group.all_reduce_batch((), retry=True)


def test_dead_ranks_get_zero_rows_in_a_dispatch_result():
    from vllm_elastic_ft.vllm.worker_group import _insert_dead_rows

    gathered = torch.arange(5).float().unsqueeze(1)  # rank 0: 2 rows, rank 2: 3 rows
    out = _insert_dead_rows(gathered, [2, 1, 3], (0, 2))
    assert out.squeeze(1).tolist() == [0, 1, 0, 2, 3, 4]


# ------------------------------------------------------------------ front end
def _request(rid="r1", prompt=(1, 2, 3), params=None):
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine import EngineCoreRequest

    return EngineCoreRequest(request_id=rid, prompt_token_ids=list(prompt), mm_features=None,
                             sampling_params=params or SamplingParams(max_tokens=32, min_tokens=4),
                             pooling_params=None, arrival_time=0.0, lora_request=None,
                             cache_salt=None, data_parallel_rank=3,
                             external_req_id=f"ext-{rid}")


def _recovery_with_generated(rid, tokens):
    from vllm_elastic_ft.vllm.frontend_recovery import FrontEndRecovery

    recovery = FrontEndRecovery()
    state = SimpleNamespace(detokenizer=SimpleNamespace(output_token_ids=list(tokens)))
    recovery.bind_llm(SimpleNamespace(output_processor=SimpleNamespace(
        request_states={rid: state})))
    return recovery


def test_a_stranded_request_continues_after_what_its_client_has():
    recovery = _recovery_with_generated("r1", [7, 8, 9, 10, 11])
    original = _request()
    cont = recovery._continuation("r1", original)
    assert cont.request_id == "r1" and cont.prompt_token_ids == [1, 2, 3, 7, 8, 9, 10, 11]
    assert cont.sampling_params.max_tokens == 27 and cont.sampling_params.min_tokens == 0
    assert cont.data_parallel_rank is None
    assert original.sampling_params.max_tokens == 32, "the cached request is not modified"


def test_a_request_moved_twice_continues_from_the_original():
    recovery = _recovery_with_generated("r1", [7, 8])
    original = _request()
    recovery.remember(original)
    first = recovery._continuation("r1", recovery.requests["r1"])
    recovery.remember(first)  # the re-submission is routed (and seen) like any request
    recovery.llm.output_processor.request_states["r1"].detokenizer.output_token_ids += [9]
    second = recovery._continuation("r1", recovery.requests["r1"])
    assert second.prompt_token_ids == [1, 2, 3, 7, 8, 9]
    assert second.sampling_params.max_tokens == 29


def test_a_request_that_already_has_all_its_tokens_is_not_resubmitted():
    from vllm.sampling_params import SamplingParams

    recovery = _recovery_with_generated("r1", list(range(8)))
    assert recovery._continuation("r1", _request(params=SamplingParams(max_tokens=8))) is None


def test_late_outputs_of_a_lost_engine_are_dropped_only_for_moved_requests():
    from vllm_elastic_ft.vllm.frontend_recovery import FrontEndRecovery

    recovery = FrontEndRecovery()
    recovery.lost.add(1)
    recovery.moved.add("moved")
    outputs = SimpleNamespace(engine_index=1,
                              outputs=[SimpleNamespace(request_id="moved"),
                                       SimpleNamespace(request_id="kept")],
                              finished_requests={"moved", "kept"})
    recovery.drop_late_outputs(outputs)
    assert [o.request_id for o in outputs.outputs] == ["kept"]
    assert outputs.finished_requests == {"kept"}
    live = SimpleNamespace(engine_index=0, outputs=[SimpleNamespace(request_id="moved")],
                           finished_requests=None)
    recovery.drop_late_outputs(live)
    assert len(live.outputs) == 1


class _LBClient:
    """Stands in for vLLM's ``DPLBAsyncMPClient``: engine 1 is lost, engine 0 lives.
    ``add_request_async`` routes as vLLM's does (``reqs_in_flight``, ``engine_inflight``)
    before it sends; with ``fail`` the send raises."""

    def __init__(self, fail: bool = False):
        from collections import Counter

        self.core_engines = [b"\x00\x00", b"\x01\x00"]
        self.core_engine = self.core_engines[1]
        self.reqs_in_flight: dict = {}
        self.engine_inflight = Counter()
        self.fail = fail
        self.added: list = []
        self.aborted: list = []

    def strand(self, rid: str) -> None:
        self.reqs_in_flight[rid] = self.core_engines[1]
        self.engine_inflight[self.core_engines[1]] += 1

    async def add_request_async(self, request) -> None:
        engine = self.core_engines[0]
        self.reqs_in_flight[request.request_id] = engine
        self.engine_inflight[engine] += 1
        if self.fail:
            raise ConnectionError("engine input socket closed")
        self.added.append(request)

    async def abort_requests_async(self, request_ids) -> None:
        self.aborted.append(list(request_ids))


def _waiting_client(rid: str, params, generated):
    """vLLM's real OutputProcessor with one request whose client (a RequestOutputCollector,
    as AsyncLLM.generate reads it) already got ``generated``; ``(recovery, processor, queue)``."""
    from vllm.v1.engine import EngineCoreOutput
    from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector

    from vllm_elastic_ft.vllm.frontend_recovery import FrontEndRecovery

    processor = OutputProcessor(None, log_stats=False)
    request = _request(rid, params=params)
    queue = RequestOutputCollector(params.output_kind, rid)
    processor.add_request(request, None, None, 0, queue)
    processor.process_outputs([EngineCoreOutput(request_id=rid, new_token_ids=list(generated))])
    assert queue.get_nowait().outputs[0].token_ids == list(generated)  # streamed already
    recovery = FrontEndRecovery()
    recovery.bind_llm(SimpleNamespace(output_processor=processor))
    recovery.remember(request)
    return recovery, processor, queue


def _lose_engine_1(recovery, client, queue, wait_s: float = 5.0):
    """Run the move of engine 1's requests while the client waits on its queue, as
    generate() does; what the client got (TimeoutError if it still waits)."""
    import asyncio

    async def run():
        recovery.client = client
        waiting = asyncio.ensure_future(queue.get())
        await asyncio.sleep(0)
        await recovery._move_requests(1)
        return await asyncio.wait_for(waiting, wait_s)

    return asyncio.run(run())


def test_a_request_whose_resubmission_fails_ends_at_once_with_a_retryable_error():
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.exceptions import GenerationError
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=32, output_kind=RequestOutputKind.DELTA)
    recovery, processor, queue = _waiting_client("r1", params, [7, 8])
    client = _LBClient(fail=True)
    client.strand("r1")
    out = _lose_engine_1(recovery, client, queue)  # before the fix: TimeoutError, it waited
    assert out.finished and out.outputs[0].finish_reason == "error"
    # What vLLM's OpenAI server makes of it: a 500 response, or an error event ending a stream.
    with pytest.raises(GenerationError):
        GenerateBaseServing._raise_if_error(None, out.outputs[0].finish_reason, "r1")
    assert recovery.failed_resubmissions == 1 and recovery.status()["requests_failed"] == 1
    assert recovery.resubmitted == 0
    assert not processor.has_unfinished_requests(), "vLLM's front end forgot it"
    assert "r1" not in recovery.requests and "r1" not in recovery.moved
    # The failed call had routed it to the live engine: undone, and aborted there.
    assert client.reqs_in_flight == {} and client.aborted == [["r1"]]
    assert all(n == 0 for n in client.engine_inflight.values())


def test_a_stranded_request_with_its_whole_budget_is_finished_with_its_tokens():
    """Its client has every token; it is not run again, and its stream ends (``length``)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=3, output_kind=RequestOutputKind.DELTA)
    recovery, processor, queue = _waiting_client("r1", params, [7, 8, 9])
    client = _LBClient()
    client.strand("r1")
    out = _lose_engine_1(recovery, client, queue)  # before the fix: TimeoutError
    assert out.finished and out.outputs[0].finish_reason == "length"
    assert client.added == [] and recovery.ended_at_budget == 1
    assert recovery.failed_resubmissions == 0 and not processor.has_unfinished_requests()


def test_a_stranded_request_is_continued_and_its_client_goes_on_waiting():
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=32, output_kind=RequestOutputKind.DELTA)
    recovery, processor, queue = _waiting_client("r1", params, [7, 8])
    client = _LBClient()
    client.strand("r1")
    with pytest.raises(TimeoutError):
        _lose_engine_1(recovery, client, queue, wait_s=0.5)  # its tokens come from engine 0
    [cont] = client.added
    assert cont.prompt_token_ids == [1, 2, 3, 7, 8] and cont.sampling_params.max_tokens == 30
    assert recovery.resubmitted == 1 and recovery.failed_resubmissions == 0
    assert processor.has_request("r1") and "r1" in recovery.moved


def test_a_stranded_request_its_front_end_already_finished_is_not_run_again():
    """The engine's "finished" can trail the request's last output: nobody waits for it."""
    import asyncio

    from vllm.sampling_params import SamplingParams

    from vllm_elastic_ft.vllm.frontend_recovery import FrontEndRecovery

    recovery = FrontEndRecovery()
    recovery.bind_llm(SimpleNamespace(output_processor=SimpleNamespace(request_states={})))
    recovery.remember(_request("r1", params=SamplingParams(max_tokens=8)))
    client = _LBClient()
    client.strand("r1")
    recovery.client = client
    asyncio.run(recovery._move_requests(1))
    assert client.added == [], "a continuation from scratch would only load a live engine"
    assert recovery.requests == {} and recovery.failed_resubmissions == 0


# -------------------------------------------------------------- checkpoint
def test_expert_weights_are_found_in_the_tiny_checkpoint(tiny_moe_path):
    from vllm_elastic_ft.vllm.expert_loader import CheckpointIndex, ExpertLoadError, _expert_names

    index = CheckpointIndex.scan(tiny_moe_path)
    gate, up, down = _expert_names(index, "model.layers.0.mlp.experts", 5)
    weights = index.read([gate, up, down])
    assert weights[gate].shape == weights[up].shape and weights[down].shape[::-1] == weights[gate].shape
    with pytest.raises(ExpertLoadError, match="expert 99 not found"):
        _expert_names(index, "model.layers.0.mlp.experts", 99)
    with pytest.raises(ExpertLoadError, match="no \\*.safetensors"):
        CheckpointIndex.scan("/nonexistent")


def test_engine_processes_inherit_the_front_ends_config():
    """What the front end exports is what every process it spawns reads (no vLLM config
    needs to be current there)."""
    import os

    from vllm_elastic_ft.config import ElasticFTConfig
    from vllm_elastic_ft.vllm import process_config

    process_config.reset_process_config()
    process_config.export_config(ElasticFTConfig(deadline_s=2.0, in_engine_rebuild=False))
    assert os.environ[process_config.CONFIG_ENV]
    config = process_config.process_config()
    assert config.deadline_s == 2.0 and config.in_engine_rebuild is False


def test_a_replacement_is_refused_for_a_live_rank_or_a_group_that_does_not_serve():
    import asyncio

    from vllm_elastic_ft.vllm.frontend_recovery import FrontEndRecovery

    recovery = FrontEndRecovery()
    recovery.lost = {1}
    with pytest.raises(ValueError, match="not lost"):
        asyncio.run(recovery.replace(2, 1.0, 1.0))
    recovery.group_view = lambda: SimpleNamespace(serving=False,
                                                  state=SimpleNamespace(value="REBUILDING"))
    with pytest.raises(ValueError, match="REBUILDING"):
        asyncio.run(recovery.replace(1, 1.0, 1.0))


def _engine_like(name: str):
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,), name=name)
    proc.start()
    return proc


def test_the_engine_monitor_watches_replacements_too(monkeypatch):
    """vLLM's engine-liveness monitor (patched): each engine exit is handed to the
    recovery; a replacement appended to the manager's list later is watched as well, so
    losing every original engine is no shutdown while replacements run."""
    from vllm_elastic_ft.vllm.patches.api_server import no_cascade

    exits = []
    recovery = SimpleNamespace(min_live_ranks=1,
                               engine_exited=lambda rank, code: exits.append(rank))
    monkeypatch.setattr(no_cascade, "frontend_recovery", lambda: recovery)
    shut = threading.Event()
    manager = SimpleNamespace(processes=[_engine_like("EngineCore_DP0"),
                                         _engine_like("EngineCore_DP1")],
                              manager_stopped=threading.Event(), failed_proc_name=None,
                              shutdown=shut.set)
    monitor = threading.Thread(target=no_cascade._make_monitor(lambda self: None),
                               args=(manager,), daemon=True)
    monitor.start()
    try:
        def wait_for(condition):
            deadline = time.monotonic() + 30
            while not condition() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert condition()

        first, lost = manager.processes
        lost.kill()
        wait_for(lambda: exits == [1])
        # The lost engine leaves the manager's list and its handle is closed: no descriptor
        # stays behind per lost engine (issue 12), and shutdown never touches it again.
        wait_for(lambda: manager.processes == [first])

        def closed() -> bool:
            try:
                lost.is_alive()
            except ValueError:  # what a closed multiprocessing.Process says
                return True
            return False

        wait_for(closed)
        replacement = _engine_like("EngineCore_DP1")
        manager.processes.append(replacement)
        time.sleep(1.5)  # one round of the monitor's wait: it picks the replacement up
        first.kill()
        wait_for(lambda: exits == [1, 0])
        assert not shut.is_set(), "the replacement still serves"
        replacement.kill()
        wait_for(shut.is_set)
        assert manager.failed_proc_name == "EngineCore_DP1" and exits == [1, 0]
    finally:
        for proc in list(manager.processes):
            proc.kill()


class _RoutedExpertsStandIn(torch.nn.Module):
    """The parts of vLLM's RoutedExperts the loader's mapping reads (a stand-in: building a
    real CPU MoE layer needs an engine)."""

    def __init__(self, slots: dict[int, int], num_experts: int = 8):
        super().__init__()
        self.layer_name = "model.layers.0.mlp.experts"
        self.w13_weight = torch.nn.Parameter(torch.randn(len(slots), 4, 2), requires_grad=False)
        self.w2_weight = torch.nn.Parameter(torch.randn(len(slots), 2, 2), requires_grad=False)
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        for expert, slot in slots.items():
            expert_map[expert] = slot
        self.expert_map_manager = SimpleNamespace(
            _expert_map=expert_map, _expert_mask=(expert_map != -1).to(torch.int32),
            global_num_experts=num_experts)
        self.expert_map_manager.expert_map = self.expert_map_manager._expert_map
        self.updates = 0

    def update_expert_map_info(self):
        self.updates += 1


def test_experts_a_survivor_gave_back_are_mapped_again_without_a_second_copy():
    """Issue 12: a survivor that gave a rejoined rank's experts back keeps their weights
    parked; losing that rank again maps them back to the same slots (no checkpoint read, no
    new slot), so its MoE memory stays at one copy of each expert over any number of faults."""
    from vllm_elastic_ft.vllm import expert_loader

    layer = _RoutedExpertsStandIn({e: e for e in range(8)})  # own 0-3, orphans 4-7 loaded
    model = torch.nn.Sequential(layer)
    weights = layer.w13_weight.data.clone()
    expert_loader.unmap_experts(model, [4, 5, 6, 7])  # rank 1 rejoined
    assert expert_loader.local_experts(layer) == [0, 1, 2, 3]
    assert expert_loader.parked_experts(layer) == {4: 4, 5: 5, 6: 6, 7: 7}
    # Rank 1 lost again: no checkpoint index is needed (None would fail on a read).
    expert_loader.load_experts(layer, [4, 5, 6, 7], index=None)
    assert expert_loader.local_experts(layer) == list(range(8))
    assert layer.expert_map_manager._expert_map.tolist() == list(range(8))
    assert layer.expert_map_manager._expert_mask.tolist() == [1] * 8
    assert layer.w13_weight.shape[0] == 8 and torch.equal(layer.w13_weight.data, weights)
    assert expert_loader.parked_experts(layer) == {}


def test_a_headless_launcher_keeps_its_other_engines_when_one_is_lost(monkeypatch):
    """A secondary node's launcher (vLLM's --headless) has no front end: a lost engine is the
    group's to heal, the node's other engines go on (stock vLLM shuts them all down)."""
    from vllm_elastic_ft.config import ElasticFTConfig
    from vllm_elastic_ft.vllm import headless
    from vllm_elastic_ft.vllm.patches.api_server import no_cascade

    monkeypatch.setattr(no_cascade, "frontend_recovery", lambda: None)
    monkeypatch.setattr(headless, "_config", None)
    shut = threading.Event()
    manager = SimpleNamespace(processes=[_engine_like("EngineCore_DP2"),
                                         _engine_like("EngineCore_DP3")],
                              manager_stopped=threading.Event(), failed_proc_name=None,
                              shutdown=shut.set)
    lost, other = manager.processes
    headless.mark(ElasticFTConfig())
    monitor = threading.Thread(target=no_cascade._make_monitor(lambda self: None),
                               args=(manager,), daemon=True)
    monitor.start()
    try:
        lost.kill()
        deadline = time.monotonic() + 30
        while manager.processes != [other] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert manager.processes == [other] and not shut.is_set(), "the other engine goes on"
        other.kill()
        assert shut.wait(30), "no engine left: shut down as stock"
    finally:
        for proc in list(manager.processes):
            proc.kill()
