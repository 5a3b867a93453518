"""The cache plugin end to end, against the memory backend and a real Redis: what hits, what misses,
what is never stored, and the per-request controls."""

from __future__ import annotations

import asyncio
import unicodedata

import openai
import pytest
from cache_support import (
    EDITS,
    GENERATIONS,
    OTHER_KEY,
    TWO_TENANTS,
    admin,
    cache_overrides,  # noqa: F401  (fixture)
    merge,
    multipart,
    post,
)

from gatekeeper.testing.fake_upstream import png_bytes
from gatekeeper.testing.kit import CLIENT_KEY

BASE = {"model": "gpt-image-1.5", "prompt": "a red fox in the snow", "quality": "low"}
PNG_A = png_bytes("a")
PNG_B = png_bytes("b")
EDIT_FIELDS = [("model", "gpt-image-1.5"), ("prompt", "add a hat"), ("image[]", PNG_A), ("image[]", PNG_B)]


def cache_plugin(gateway):
    return gateway.gateway.plugins.hooks.pm.get_plugin("cache")


async def wait_for_stores(gateway) -> None:
    """Redis writes happen off the response path; let them land before asserting on Redis."""
    plugin = cache_plugin(gateway)
    while plugin._tasks:
        await asyncio.wait(list(plugin._tasks))


# ---------------------------------------------------------------- hits and misses


async def test_hook_cache_lookup_answers_a_repeated_request_from_the_cache(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    first = await post(gateway, GENERATIONS, json=BASE)
    second = await post(gateway, GENERATIONS, json=BASE)
    assert (first.cache, second.cache) == ("MISS", "HIT")
    assert second.body == first.body
    assert fake_upstream.count(GENERATIONS) == 1


async def test_a_hit_replays_the_upstream_headers_and_adds_age(gateway_kit, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    first = await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    second = await post(gateway, GENERATIONS, json=BASE)
    assert second.headers["x-request-id"] == first.headers["x-request-id"]
    assert second.headers["openai-processing-ms"] == first.headers["openai-processing-ms"]
    assert second.headers["content-type"] == first.headers["content-type"]
    assert int(second.headers["age"]) >= 0 and "age" not in first.headers
    assert second.headers["x-gatekeeper-request-id"] != first.headers["x-gatekeeper-request-id"]


async def test_a_hit_through_the_sdk_carries_the_original_usage(gateway_kit, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        first = await client.images.with_raw_response.generate(**BASE)
        await wait_for_stores(gateway)
        second = await client.images.with_raw_response.generate(**BASE)
    assert second.headers["x-gatekeeper-cache"] == "HIT"
    assert second.parse().usage == first.parse().usage
    assert second.parse().data[0].b64_json == first.parse().data[0].b64_json


async def test_a_hit_restores_usage_and_annotations_on_the_flow(gateway_kit, cache_overrides):
    from gatekeeper import hookimpl

    class Annotate:
        """Stands in for metering and audit: derives facts once, on the miss only."""

        name = "annotate"

        @hookimpl  # after metering (tryfirst), before the cache (trylast)
        def exchange_complete(self, flow):
            if flow.cache_status == "MISS":
                flow.usage = {"total_tokens": 7}
                flow.annotations["image_sha256"] = ["abc"]

    class Recorder:
        """Sees each flow's usage and annotations as the cache is about to store or has restored them."""

        name = "recorder"

        def __init__(self):
            self.seen = []

        @hookimpl(trylast=True)  # registered after the built-ins: runs just before the cache's impl
        def exchange_complete(self, flow):
            self.seen.append((flow.cache_status, flow.usage, dict(flow.annotations), flow.outcome))

    recorder = Recorder()
    gateway = await gateway_kit.start(cache_overrides, plugins=[Annotate(), recorder])
    await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    await post(gateway, GENERATIONS, json=BASE)
    (miss_status, *on_miss), (hit_status, *on_hit) = recorder.seen
    assert (miss_status, hit_status) == ("MISS", "HIT")
    assert on_hit[:2] == on_miss[:2]
    assert on_hit[0] == {"total_tokens": 7} and on_hit[1]["image_sha256"] == ["abc"]
    assert on_hit[2] == "cache_hit"


async def test_annotations_added_after_the_response_are_stored_with_the_entry(gateway_kit, fake_upstream,
                                                                             cache_overrides):
    from gatekeeper import hookimpl

    release = asyncio.Event()
    seen_on_hits: list[object] = []

    class LateFacts:
        """Derives a fact the client need not wait for, the way the audit hashes a large answer."""

        name = "late_facts"

        @hookimpl
        def exchange_complete(self, flow):
            if flow.cache_status == "HIT":
                seen_on_hits.append(flow.annotations.get("late"))
                return

            async def derive():
                await release.wait()
                flow.annotations["late"] = "known after the response"

            flow.annotate_later(asyncio.ensure_future(derive()))

    gateway = await gateway_kit.start(cache_overrides, plugins=[LateFacts()])
    first = await asyncio.wait_for(post(gateway, GENERATIONS, json=BASE), 5)  # not held for the fact
    assert first.cache == "MISS"
    second = asyncio.create_task(post(gateway, GENERATIONS, json=BASE))
    await asyncio.sleep(0.2)
    assert not second.done(), "the entry was stored before its annotations were complete"
    release.set()
    second_answer = await asyncio.wait_for(second, 5)
    assert second_answer.cache == "HIT" and second_answer.body == first.body
    assert fake_upstream.count(GENERATIONS) == 1
    assert seen_on_hits == ["known after the response"]


async def test_non_cacheable_routes_carry_no_cache_header(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    first = await post(gateway, "/v1/chat/completions", json=chat)
    second = await post(gateway, "/v1/chat/completions", json=chat)
    assert first.status == second.status == 200
    assert first.cache is None and second.cache is None
    assert fake_upstream.count("/v1/chat/completions") == 2


async def test_chat_is_cached_when_endpoints_lists_it(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(merge(cache_overrides, {"cache": {"endpoints": ["chat/completions"]}}))
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    first = await post(gateway, "/v1/chat/completions", json=chat)
    await wait_for_stores(gateway)
    second = await post(gateway, "/v1/chat/completions", json=chat)
    assert (first.cache, second.cache) == ("MISS", "HIT") and second.body == first.body
    images = await post(gateway, GENERATIONS, json=BASE)
    assert images.cache is None  # endpoints lists every cached route: images left out here


# ---------------------------------------------------------------- the key matrix


VARIANTS = [
    ("model", "gpt-image-1"), ("n", 2), ("size", "1024x1536"), ("quality", "high"), ("output_format", "webp"),
    ("output_compression", 80), ("background", "opaque"), ("moderation", "low"), ("stream", True),
]


@pytest.mark.parametrize("field, value", VARIANTS, ids=[field for field, _ in VARIANTS])
async def test_changing_one_parameter_is_a_miss(gateway_kit, fake_upstream, cache_overrides, field, value):
    gateway = await gateway_kit.start(cache_overrides)
    await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    changed = await post(gateway, GENERATIONS, json={**BASE, field: value})
    assert changed.status == 200 and changed.cache == "MISS"
    assert fake_upstream.count(GENERATIONS) == 2


async def test_changing_partial_images_is_a_miss(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    streaming = {**BASE, "stream": True, "partial_images": 1}
    await post(gateway, GENERATIONS, json=streaming)
    await wait_for_stores(gateway)
    changed = await post(gateway, GENERATIONS, json={**streaming, "partial_images": 2})
    assert changed.cache == "MISS" and fake_upstream.count(GENERATIONS) == 2


EDIT_VARIANTS = {
    "image_bytes": [*EDIT_FIELDS[:3], ("image[]", png_bytes("c"))],
    "image_order": [*EDIT_FIELDS[:2], EDIT_FIELDS[3], EDIT_FIELDS[2]],
    "mask": [*EDIT_FIELDS, ("mask", png_bytes("mask"))],
}


@pytest.mark.parametrize("variant", list(EDIT_VARIANTS))
async def test_changing_an_edit_input_is_a_miss(gateway_kit, fake_upstream, cache_overrides, variant):
    gateway = await gateway_kit.start(cache_overrides)
    body, content_type = multipart(EDIT_FIELDS)
    await post(gateway, EDITS, data=body, headers={"Content-Type": content_type})
    await wait_for_stores(gateway)
    body, content_type = multipart(EDIT_VARIANTS[variant])
    changed = await post(gateway, EDITS, data=body, headers={"Content-Type": content_type})
    assert changed.status == 200 and changed.cache == "MISS"
    assert fake_upstream.count(EDITS) == 2


FORMATTING = {
    "key_order": b'{"quality":"low","prompt":"a red fox in the snow","model":"gpt-image-1.5"}',
    "whitespace": b'{ "model" : "gpt-image-1.5" ,\n "prompt": "  a red  fox in\\tthe snow ", "quality":"low" }',
    "default_n": b'{"model":"gpt-image-1.5","prompt":"a red fox in the snow","quality":"low","n":1}',
    "default_stream": b'{"model":"gpt-image-1.5","prompt":"a red fox in the snow","quality":"low","stream":false}',
}


@pytest.mark.parametrize("variant", list(FORMATTING))
async def test_a_formatting_only_change_is_a_hit(gateway_kit, fake_upstream, cache_overrides, variant):
    gateway = await gateway_kit.start(cache_overrides)
    first = await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    again = await post(gateway, GENERATIONS, data=FORMATTING[variant], headers={"Content-Type": "application/json"})
    assert again.cache == "HIT" and again.body == first.body
    assert fake_upstream.count(GENERATIONS) == 1


async def test_a_prompt_in_another_unicode_normal_form_is_a_hit(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    await post(gateway, GENERATIONS, json={**BASE, "prompt": unicodedata.normalize("NFC", "crème brûlée")})
    await wait_for_stores(gateway)
    again = await post(gateway, GENERATIONS, json={**BASE, "prompt": unicodedata.normalize("NFD", "crème brûlée")})
    assert again.cache == "HIT" and fake_upstream.count(GENERATIONS) == 1


async def test_a_new_multipart_boundary_is_a_hit(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    body, content_type = multipart(EDIT_FIELDS, "boundary-one")
    first = await post(gateway, EDITS, data=body, headers={"Content-Type": content_type})
    await wait_for_stores(gateway)
    body, content_type = multipart(EDIT_FIELDS, "boundary-two")
    again = await post(gateway, EDITS, data=body, headers={"Content-Type": content_type})
    assert again.cache == "HIT" and again.body == first.body
    assert fake_upstream.count(EDITS) == 1


async def test_an_sdk_edit_sent_twice_is_a_hit(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        first = await client.images.with_raw_response.edit(
            model="gpt-image-1.5", prompt="add a hat", image=[("a.png", PNG_A), ("b.png", PNG_B)], n=2)
        await wait_for_stores(gateway)
        second = await client.images.with_raw_response.edit(
            model="gpt-image-1.5", prompt="add a hat", image=[("x.png", PNG_A), ("y.png", PNG_B)], n=2)
    assert second.headers["x-gatekeeper-cache"] == "HIT"
    assert second.parse().data[1].b64_json == first.parse().data[1].b64_json
    assert fake_upstream.count(EDITS) == 1


async def test_embeddings_are_replayed_in_the_format_asked_for(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        first = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello")
        await wait_for_stores(gateway)
        second = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello")
    as_float = await post(gateway, "/v1/embeddings", json={"model": "text-embedding-3-small", "input": "hello"})
    assert second.headers["x-gatekeeper-cache"] == "HIT"
    assert second.parse().data[0].embedding == first.parse().data[0].embedding
    assert as_float.cache == "MISS"  # the SDK asked for base64; a float answer is a different entry
    assert isinstance(as_float.json()["data"][0]["embedding"], list)


# ---------------------------------------------------------------- tenants


async def test_tenant_b_misses_tenant_a_entry(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(merge(cache_overrides, TWO_TENANTS))
    await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    other = await post(gateway, GENERATIONS, json=BASE, key=OTHER_KEY)
    assert other.status == 200 and other.cache == "MISS"
    assert fake_upstream.count(GENERATIONS) == 2


async def test_global_scope_shares_entries_across_tenants(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(merge(cache_overrides, TWO_TENANTS, {"cache": {"scope": "global"}}))
    await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    other = await post(gateway, GENERATIONS, json=BASE, key=OTHER_KEY)
    assert other.cache == "HIT" and fake_upstream.count(GENERATIONS) == 1


# ---------------------------------------------------------------- never stored


async def test_error_responses_are_never_stored(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    fake_upstream.inject(path=GENERATIONS, status=500)
    failed = await post(gateway, GENERATIONS, json=BASE)
    again = await post(gateway, GENERATIONS, json=BASE)
    assert failed.status == 500 and failed.cache == "MISS"
    assert again.status == 200 and again.cache == "MISS"


async def test_an_upstream_no_store_answer_is_not_stored(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    fake_upstream.inject(path=GENERATIONS, status=200, headers={"Cache-Control": "no-store"})
    await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    again = await post(gateway, GENERATIONS, json=BASE)
    assert again.cache == "MISS" and fake_upstream.count(GENERATIONS) == 2


@pytest.mark.parametrize(("content_type", "body"), [
    ("text/html", b"<html><body>Please sign in to the proxy</body></html>"),
    ("application/json", b""),
    ("application/json", b"[1, 2]"),
    ("application/json", b'{"created": 1, "data": ['),
    ("application/json", b'{"created": 1, "data": ["' + b"A" * 100_000),  # large: judged by its ends
], ids=["html-page", "empty", "array", "cut-short", "large-cut-short"])
async def test_a_200_that_is_no_answer_is_not_stored(gateway_kit, fake_upstream, cache_overrides, content_type, body):
    """A relay's page or a broken document answered 200 goes to its client as it came, and no further."""
    gateway = await gateway_kit.start(cache_overrides)
    fake_upstream.inject(path=GENERATIONS, status=200, body=body, headers={"Content-Type": content_type})
    first = await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    again = await post(gateway, GENERATIONS, json=BASE)
    assert (first.status, first.body) == (200, body)
    assert (again.status, again.cache) == (200, "MISS") and fake_upstream.count(GENERATIONS) == 2


async def test_an_answer_over_max_entry_bytes_is_not_stored(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(merge(cache_overrides, {"cache": {"max_entry_bytes": 200}}))
    await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    again = await post(gateway, GENERATIONS, json=BASE)
    assert again.cache == "MISS" and fake_upstream.count(GENERATIONS) == 2


# ---------------------------------------------------------------- per-request controls


async def test_no_cache_skips_the_lookup_and_stores_the_fresh_answer(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    fresh = await post(gateway, GENERATIONS, json={**BASE}, headers={"Cache-Control": "no-cache"})
    await wait_for_stores(gateway)
    after = await post(gateway, GENERATIONS, json=BASE)
    assert fresh.cache == "BYPASS" and fake_upstream.count(GENERATIONS) == 2
    assert after.cache == "HIT" and after.headers["x-request-id"] == fresh.headers["x-request-id"]


async def test_no_store_neither_reads_nor_writes(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    bypass = await post(gateway, GENERATIONS, json={**BASE, "prompt": "new"}, headers={"Cache-Control": "no-store"})
    await wait_for_stores(gateway)
    after = await post(gateway, GENERATIONS, json={**BASE, "prompt": "new"})
    again = await post(gateway, GENERATIONS, json=BASE, headers={"Cache-Control": "no-store"})
    assert bypass.cache == "BYPASS" and after.cache == "MISS"
    assert again.cache == "BYPASS" and fake_upstream.count(GENERATIONS) == 4


async def test_the_ttl_header_sets_this_entrys_lifetime(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    await post(gateway, GENERATIONS, json=BASE, headers={"x-gatekeeper-cache-ttl": "0.3"})
    await wait_for_stores(gateway)
    soon = await post(gateway, GENERATIONS, json=BASE)
    await asyncio.sleep(0.45)
    later = await post(gateway, GENERATIONS, json=BASE)
    assert soon.cache == "HIT" and later.cache == "MISS"


async def test_a_ttl_of_zero_is_not_stored(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    await post(gateway, GENERATIONS, json=BASE, headers={"x-gatekeeper-cache-ttl": "0"})
    await wait_for_stores(gateway)
    again = await post(gateway, GENERATIONS, json=BASE)
    assert again.cache == "MISS" and fake_upstream.count(GENERATIONS) == 2


async def test_a_malformed_ttl_header_is_a_400(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    reply = await post(gateway, GENERATIONS, json=BASE, headers={"x-gatekeeper-cache-ttl": "soon"})
    assert reply.status == 400 and reply.json()["error"]["param"] == "x-gatekeeper-cache-ttl"
    assert fake_upstream.count(GENERATIONS) == 0


async def test_the_ttl_header_is_not_forwarded(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    await post(gateway, GENERATIONS, json=BASE, headers={"x-gatekeeper-cache-ttl": "60"})
    assert "x-gatekeeper-cache-ttl" not in fake_upstream.calls[-1].headers


async def test_dall_e_url_answers_are_kept_at_most_55_minutes(gateway_kit, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    dalle = {"model": "dall-e-2", "prompt": "a fox", "response_format": "url"}
    first = await post(gateway, GENERATIONS, json=dalle)
    await wait_for_stores(gateway)
    assert "url" in first.json()["data"][0]
    plugin = cache_plugin(gateway)
    key = next(iter(k for k in _stored_keys(plugin)))
    remaining = await _ttl_of(plugin, key)
    assert 55 * 60 - 5 < remaining <= 55 * 60


async def test_b64_answers_keep_the_configured_ttl(gateway_kit, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    plugin = cache_plugin(gateway)
    remaining = await _ttl_of(plugin, next(iter(_stored_keys(plugin))))
    assert 86400 - 5 < remaining <= 86400


def _stored_keys(plugin):
    if plugin.settings.backend == "memory":
        return list(plugin.store.cache._items)
    return [plugin.store.entry_prefix + "*"]


async def _ttl_of(plugin, key: str) -> float:
    if plugin.settings.backend == "memory":
        return plugin.store.cache.expires_in(key)
    keys = [k async for k in plugin.store.client.scan_iter(match=key)]
    assert len(keys) == 1
    return await plugin.store.client.pttl(keys[0]) / 1000


# ---------------------------------------------------------------- streams


STREAM = {**BASE, "stream": True, "partial_images": 2}


async def test_a_streamed_generation_replays_byte_for_byte(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    first = await post(gateway, GENERATIONS, json=STREAM)
    await wait_for_stores(gateway)
    second = await post(gateway, GENERATIONS, json=STREAM)
    assert first.headers["content-type"].startswith("text/event-stream")
    assert second.cache == "HIT" and second.body == first.body
    assert second.headers["content-type"] == first.headers["content-type"]
    assert first.body.count(b"event: image_generation.partial_image") == 2
    assert fake_upstream.count(GENERATIONS) == 1


async def test_a_replayed_stream_parses_into_the_same_events_in_the_sdk(gateway_kit, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        first = [event async for event in await client.images.generate(**STREAM)]
        await wait_for_stores(gateway)
        second = [event async for event in await client.images.generate(**STREAM)]
    assert [e.type for e in second] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert second == first


async def test_a_truncated_stream_reaches_the_client_broken_and_is_never_stored(gateway_kit, fake_upstream,
                                                                                cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    fake_upstream.inject(path=GENERATIONS, status=200, cut_after_events=1)
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=CLIENT_KEY, max_retries=0) as client:
        with pytest.raises(openai.APIError):
            async for _ in await client.images.generate(**STREAM):
                pass
        await wait_for_stores(gateway)
        events = [event async for event in await client.images.generate(**STREAM)]
    assert events[-1].type == "image_generation.completed"
    assert fake_upstream.count(GENERATIONS) == 2


async def test_a_streamed_miss_carries_the_miss_header(gateway_kit, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    first = await post(gateway, GENERATIONS, json=STREAM)
    assert first.cache == "MISS" and first.status == 200


# ---------------------------------------------------------------- admin and stats


async def test_admin_purge_deletes_every_entry(gateway_kit, fake_upstream, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    await post(gateway, GENERATIONS, json=BASE)
    await post(gateway, GENERATIONS, json={**BASE, "prompt": "another"})
    await wait_for_stores(gateway)
    purged = await admin(gateway, "DELETE", "/admin/cache")
    after = await post(gateway, GENERATIONS, json=BASE)
    assert purged.status == 200 and purged.json() == {"deleted": 2}
    assert after.cache == "MISS"


async def test_admin_purge_of_one_tenant_keeps_the_others(gateway_kit, cache_overrides):
    gateway = await gateway_kit.start(merge(cache_overrides, TWO_TENANTS))
    await post(gateway, GENERATIONS, json=BASE)
    await post(gateway, GENERATIONS, json=BASE, key=OTHER_KEY)
    await wait_for_stores(gateway)
    purged = await admin(gateway, "DELETE", "/admin/cache?tenant=other")
    mine = await post(gateway, GENERATIONS, json=BASE)
    theirs = await post(gateway, GENERATIONS, json=BASE, key=OTHER_KEY)
    assert purged.json() == {"deleted": 1}
    assert (mine.cache, theirs.cache) == ("HIT", "MISS")


async def test_admin_purge_needs_the_admin_key(gateway_kit, cache_overrides):
    gateway = await gateway_kit.start(cache_overrides)
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.delete(gateway.url + "/admin/cache",
                                  headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
            assert response.status in (401, 403)


async def test_stats_are_exported_as_metrics(gateway_kit, cache_overrides):
    import aiohttp

    gateway = await gateway_kit.start(cache_overrides)
    await post(gateway, GENERATIONS, json=BASE)
    await wait_for_stores(gateway)
    await post(gateway, GENERATIONS, json=BASE)
    await post(gateway, GENERATIONS, json=BASE, headers={"Cache-Control": "no-store"})
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/metrics") as response:
            metrics = await response.text()
    assert "gatekeeper_cache_hits_total 1.0" in metrics
    assert "gatekeeper_cache_misses_total 1.0" in metrics
    assert "gatekeeper_cache_bypasses_total 1.0" in metrics
    assert "gatekeeper_cache_stores_total 1.0" in metrics
    assert "gatekeeper_cache_coalesced_total 0.0" in metrics


async def test_hook_ready_check_reports_the_cache_backend(gateway_kit, cache_overrides):
    import aiohttp

    gateway = await gateway_kit.start(cache_overrides)
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/ready") as response:
            report = (await response.json())["plugins"]["cache"]
    assert report["ready"] is True and report["backend"] == cache_overrides["cache"]["backend"]
    if report["backend"] == "redis":
        assert report["redis"] == "up"


async def test_a_cache_setting_with_a_wrong_value_names_the_key_and_the_file(gateway_kit):
    from gatekeeper.config import ConfigError

    with pytest.raises(ConfigError, match=r"test-config\.toml: \[cache\.backend\]"):
        await gateway_kit.start({"cache": {"backend": "disk"}})
    with pytest.raises(ConfigError, match=r"\[cache\.endpoints"):
        await gateway_kit.start({"cache": {"endpoints": ["models"]}})
