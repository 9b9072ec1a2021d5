"""The service's state stores (``serving/state``): the memory and Redis stores keep the same
contract (a real ``redis-server``); the URL picks the backend; the replay cache and the rate
limit use the store; without ``--state`` the service keeps everything in its own process, as
before (same audit file, a bounded in-memory replay cache, jobs in memory)."""

from __future__ import annotations

import time

import pytest

from meddx.errors import ConfigError
from meddx.serving.auth import JWTVerifier, ReplayCache, StoreReplay
from meddx.serving.limits import RateLimitedError, RateLimiter
from meddx.serving.settings import ServeSettings
from meddx.serving.state import MemoryStore, StateUnavailableError, open_state
from redis_support import redis_server


@pytest.fixture(scope="module")
def redis():
    with redis_server() as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield open_state(None)
        return
    s = open_state(request.getfixturevalue("redis").url)
    s._r.flushdb()
    yield s
    s.close()


def test_a_claim_is_granted_once_until_it_expires(store):
    assert store.claim("jti:x", 0.3) is True
    assert store.claim("jti:x", 0.3) is False
    time.sleep(0.4)
    assert store.claim("jti:x", 0.3) is True


def test_values_indexes_and_rate_windows(store):
    store.put("job:1", b"{}", 60)
    assert store.get("job:1") == b"{}" and store.get("job:2") is None
    store.delete("job:1")
    assert store.get("job:1") is None
    store.put("short", b"x", 0.2)
    time.sleep(0.3)
    assert store.get("short") is None
    for i, score in enumerate([3.0, 1.0, 2.0]):
        store.index_add("jobs:o", f"j{i}", score, 60)
    assert store.index_members("jobs:o", 2) == ["j0", "j2"]
    store.index_remove("jobs:o", "j0")
    assert store.index_members("jobs:o", 5) == ["j2", "j1"]
    counts = [store.hit("rate:k", 60)[0] for _ in range(3)]
    assert counts == [1, 2, 3] and 0 < store.hit("rate:k", 60)[1] <= 60


def test_two_redis_clients_share_one_replay_cache(redis):
    """What two replicas do: a token id claimed through one client is refused by the other."""
    a, b = open_state(redis.url), open_state(redis.url)
    now = time.time()
    assert StoreReplay(a).add("https://ehr", "jti-1", now + 60, now) is True
    assert StoreReplay(b).add("https://ehr", "jti-1", now + 60, now) is False
    assert StoreReplay(b).add("https://ehr", "jti-2", now + 60, now) is True


def test_the_rate_limit_counts_through_a_shared_store(redis):
    from meddx.serving.auth import Caller

    a, b = RateLimiter(open_state(redis.url), 3), RateLimiter(open_state(redis.url), 3)
    caller = Caller(kind="api-key", id=f"k-{time.time()}")
    if time.time() % 60 > 55:
        time.sleep(6)
    a.check(caller), b.check(caller), a.check(caller)
    with pytest.raises(RateLimitedError) as e:
        b.check(caller)
    assert e.value.status_code == 429 and 1 <= e.value.retry_after <= 60
    RateLimiter(open_state(None), 3).check(caller)  # a memory store counts alone


def test_an_unreachable_redis_is_a_503_error_with_a_hint(redis):
    from redis_support import free_port

    s = open_state(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StateUnavailableError) as e:
        s.claim("x", 1)
    assert e.value.status_code == 503 and "Redis" in e.value.hint


def test_the_url_picks_the_backend():
    assert isinstance(open_state(None), MemoryStore)
    assert isinstance(open_state("memory://"), MemoryStore)
    with pytest.raises(ConfigError, match="unknown state store"):
        open_state("mysql://db/x")
    with pytest.raises(ConfigError) as e:
        open_state("redis://:secret@127.0.0.1:notaport/0")
    assert "secret" not in str(e.value)


def test_a_service_whose_redis_is_down_does_not_start(tmp_path):
    from meddx.serving.app import create_app
    from redis_support import free_port

    settings = ServeSettings(insecure_no_auth=True, warmup=False,
                             audit_log=tmp_path / "audit.jsonl",
                             state_url=f"redis://:pw@127.0.0.1:{free_port()}/0")
    with pytest.raises(ConfigError, match="does not answer") as e:
        create_app([], settings)
    assert "pw" not in str(e.value)


def test_without_state_nothing_is_shared(tmp_path):
    from meddx.serving.app import create_app

    settings = ServeSettings(insecure_no_auth=True, warmup=False, replay_cache_size=7,
                             audit_log=tmp_path / "audit.jsonl")
    assert settings.replica is None
    st = create_app([], settings).state.meddx
    assert st.store.shared is False and st.limiter is None
    assert st.audit.path == tmp_path / "audit.jsonl"  # the file name as before
    verifier = JWTVerifier(settings, store=st.store)
    assert isinstance(verifier.replay, ReplayCache) and verifier.replay.max_size == 7


def test_a_replica_name_is_checked_and_named_in_its_audit_file(tmp_path):
    from pydantic import ValidationError

    from meddx.serving.app import create_app, replica_path

    with pytest.raises(ValidationError):
        ServeSettings(replica_name="../etc")
    assert replica_path(tmp_path / "audit.jsonl", "w-1") == tmp_path / "audit.w-1.jsonl"
    settings = ServeSettings(insecure_no_auth=True, warmup=False, replica_name="w-1",
                             audit_log=tmp_path / "audit.jsonl")
    assert create_app([], settings).state.meddx.audit.path == tmp_path / "audit.w-1.jsonl"
    shared = ServeSettings(state_url="redis://127.0.0.1:1/0")
    assert shared.replica and shared.replica.endswith(f"-{__import__('os').getpid()}")


def test_a_heat_map_link_made_on_one_replica_opens_on_another(redis, tmp_path):
    from meddx.errors import NotFoundError
    from meddx.serving.heatmaps import HeatmapStore

    a = HeatmapStore(tmp_path / "a", "same-secret", 60, shared=open_state(redis.url))
    b = HeatmapStore(tmp_path / "b", "same-secret", 60, shared=open_state(redis.url))
    rid = a.put({"overlay.png": b"\x89PNG-a"}, {"label": "x"})
    exp, sig = (kv.split("=")[1] for kv in a.query(rid).split("&"))
    b.check(rid, int(exp), sig)
    assert b.info(rid)["info"] == {"label": "x"} and b.file(rid, "overlay.png") == b"\x89PNG-a"
    with pytest.raises(NotFoundError):
        b.file(rid, "other.png")
    alone = HeatmapStore(tmp_path / "c", "same-secret", 60, shared=open_state(None))
    with pytest.raises(NotFoundError):
        alone.info(rid)  # without a shared store a result stays on its replica


def test_a_single_process_queue_lists_only_the_callers_jobs(tmp_path):
    """Without a shared store: jobs in memory, listed per owner, nothing written elsewhere."""
    import threading

    from meddx.serving.jobs import JobQueue

    release = threading.Event()
    q = JobQueue(tmp_path / "jobs", 1, 4, run=lambda job: release.wait(10) and {} or {},
                 store=open_state(None))
    try:
        mine = q.submit("slides", "me", q.new_folder(), tmp_path / "s.tiff", False)
        q.submit("slides", "other", q.new_folder(), tmp_path / "t.tiff", False)
        later = q.submit("slides", "me", q.new_folder(), tmp_path / "u.tiff", False)
        assert [j.id for j in q.for_owner("me")] == [later.id, mine.id]
        assert q.for_owner("me", model="other-model") == []
        assert "replica" not in mine.describe()  # a single service names no replica
        q.cancel(later)
        assert q.get(later.id, "me").status == "cancelled"
    finally:
        release.set()
        q.close()
