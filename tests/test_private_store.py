"""The watchdog store is private (``vllm/watchdog_store.py``, ``comm/store.py``): it listens on
the address it advertises only, a process without the deployment's secret can neither read nor
write the group's keys (a stall injected that way reaches nobody), and the status endpoint shows
neither the address nor the secret. Real TCPStores, real sockets."""

from __future__ import annotations

import json
from datetime import timedelta

import psutil
import pytest
import torch.distributed as dist

from vllm_elastic_ft import faults
from vllm_elastic_ft.comm import keys
from vllm_elastic_ft.comm.store import connect_store, parse_locator, without_secret
from vllm_elastic_ft.config import ElasticFTConfig
from vllm_elastic_ft.vllm import watchdog_store


@pytest.fixture
def hosted(monkeypatch):
    """A store hosted the way an API server hosts it; returns its locator."""
    monkeypatch.delenv(watchdog_store.STORE_ENV, raising=False)
    monkeypatch.delenv(watchdog_store.STORE_SECRET_ENV, raising=False)
    monkeypatch.setattr(watchdog_store, "_hosted", None)
    monkeypatch.setattr(watchdog_store, "_listener", None)
    found = watchdog_store.host_store(ElasticFTConfig())
    yield found
    monkeypatch.delenv(watchdog_store.STORE_ENV, raising=False)


def _listening_ips(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_the_store_listens_on_loopback_only(hosted):
    secret, host, port = parse_locator(hosted)
    assert host == "127.0.0.1" and secret and len(secret) == 32
    assert _listening_ips(port) == {"127.0.0.1"}, "torch's own server would listen on every " \
        "interface (*:PORT)"


def test_torch_alone_would_listen_everywhere():
    """Why the front end binds the socket itself: the bare TCPStore server binds all."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=5))
    assert _listening_ips(store.port) - {"127.0.0.1"}, "torch started to honour the host"


def test_a_process_without_the_secret_cannot_read_or_stall_the_group(hosted):
    group_store = connect_store(hosted)
    group_store.set(keys.epoch("dp"), "3")
    group_store.set(keys.heartbeat("dp", 3, 1), "beat")
    outsider = connect_store(without_secret(hosted))  # reached the port, has no secret
    assert not outsider.check([keys.epoch("dp")]), "the group's keys are out of sight"
    assert not outsider.check([keys.heartbeat("dp", 3, 1)])
    # What an outsider did to stall serving before (issue 12): a slow-rank knob.
    faults.set_slow(outsider, "dp", 1, 3.0)
    assert not group_store.check([keys.inject_slow("dp", 1)]), "the ranks never see it"
    wrong = connect_store(f"{'0' * 32}@{without_secret(hosted)}")
    assert not wrong.check([keys.epoch("dp")]), "a guessed secret sees nothing either"


def test_an_operator_secret_is_used_and_the_locator_is_what_engines_inherit(monkeypatch):
    monkeypatch.delenv(watchdog_store.STORE_ENV, raising=False)
    monkeypatch.setenv(watchdog_store.STORE_SECRET_ENV, "f" * 32)
    monkeypatch.setattr(watchdog_store, "_hosted", None)
    found = watchdog_store.host_store(ElasticFTConfig())
    assert parse_locator(found)[0] == "f" * 32
    import os

    assert os.environ[watchdog_store.STORE_ENV] == found


def test_status_shows_neither_the_store_address_nor_its_secret(hosted):
    from vllm_elastic_ft.vllm.endpoints import FrontEndGroup

    group = FrontEndGroup(connect_store(hosted), 2, 8, ElasticFTConfig())
    group.store_address = hosted
    shown = json.dumps(group.status())
    secret, host, port = parse_locator(hosted)
    assert secret not in shown and f"{host}:{port}" not in shown and "store" not in \
        group.status()["watchdog"], shown


def test_a_bad_locator_is_refused_with_what_is_accepted():
    with pytest.raises(ValueError, match="'secret@host:port' or 'host:port'"):
        parse_locator("s3cret@nohost")
    with pytest.raises(ValueError) as err:
        parse_locator("abc@host:port")
    assert "abc" not in str(err.value), "the secret never goes into an error message"
