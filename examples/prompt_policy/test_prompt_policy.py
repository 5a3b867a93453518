"""The prompt policy refuses deny-listed image prompts the way OpenAI's safety system does, upstream untouched."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from examples.prompt_policy import prompt_policy
from gatekeeper import hookimpl
from gatekeeper.config import ConfigError
from gatekeeper.testing.kit import CLIENT_KEY

POLICY = {"prompt_policy": {"words": ["acme", "project falcon"], "patterns": [r"\b\d{3}-\d{2}-\d{4}\b"]}}
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels"


async def start(gateway_kit, policy: dict = POLICY, plugins: tuple = ()):
    running = await gateway_kit.start(policy, plugins=[prompt_policy, *plugins])
    return running, openai.AsyncOpenAI(base_url=running.base_url, api_key=CLIENT_KEY, max_retries=0)


async def refusal(client: openai.AsyncOpenAI, prompt: str) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.images.generate(model="gpt-image-1-mini", prompt=prompt, quality="low")
    return caught.value


async def test_a_deny_listed_word_gets_openais_moderation_error_without_an_upstream_call(gateway_kit, fake_upstream):
    _, client = await start(gateway_kit)
    async with client:
        error = await refusal(client, "a poster for ACME rockets")
    assert error.status_code == 400
    assert (error.code, error.type, error.param) == ("moderation_blocked", "image_generation_user_error", None)
    assert error.request_id and error.request_id in error.message
    assert fake_upstream.count() == 0


async def test_a_deny_listed_phrase_is_refused_however_it_is_spaced(gateway_kit, fake_upstream):
    _, client = await start(gateway_kit)
    async with client:
        error = await refusal(client, "concept art for Project \n Falcon")
    assert error.code == "moderation_blocked" and fake_upstream.count() == 0


async def test_a_pattern_match_is_refused(gateway_kit, fake_upstream):
    _, client = await start(gateway_kit)
    async with client:
        error = await refusal(client, "an ID card with number 123-45-6789")
    assert error.code == "moderation_blocked" and fake_upstream.count() == 0


async def test_words_match_only_as_whole_words(gateway_kit, fake_upstream):
    _, client = await start(gateway_kit)
    async with client:
        result = await client.images.generate(model="gpt-image-1-mini", prompt="the acmeist poets at dusk", quality="low")
    assert result.data[0].b64_json
    assert fake_upstream.count("/v1/images/generations") == 1


@pytest.mark.parametrize("disguised", ["a poster for A\u200bCME", "a poster for \uff21\uff23\uff2d\uff25", "a poster for aCmE"])
async def test_case_width_and_invisible_characters_do_not_get_around_it(gateway_kit, fake_upstream, disguised):
    _, client = await start(gateway_kit)
    async with client:
        error = await refusal(client, disguised)
    assert error.code == "moderation_blocked" and fake_upstream.count() == 0


async def test_a_multipart_edit_prompt_is_checked_too(gateway_kit, fake_upstream):
    _, client = await start(gateway_kit)
    async with client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.edit(model="gpt-image-1.5", image=("in.png", PNG, "image/png"),
                                     prompt="put the acme logo on it")
    assert caught.value.code == "moderation_blocked" and fake_upstream.count() == 0


async def test_a_streaming_request_is_refused_before_any_event(gateway_kit, fake_upstream):
    _, client = await start(gateway_kit)
    async with client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.images.generate(model="gpt-image-1.5", prompt="acme", stream=True, partial_images=1)
    assert caught.value.code == "moderation_blocked" and fake_upstream.count() == 0


async def test_the_refusal_is_an_openai_shaped_body_the_sdk_is_told_not_to_retry(gateway_kit):
    running, client = await start(gateway_kit)
    await client.close()
    async with aiohttp.ClientSession() as session:
        async with session.post(running.base_url + "/images/generations",
                                json={"model": "gpt-image-1", "prompt": "acme"},
                                headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response:
            body = await response.json()
            headers = response.headers
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert headers["x-should-retry"] == "false"
    assert headers["x-request-id"] in body["error"]["message"]


async def test_a_refused_flow_ends_as_rejected(gateway_kit):
    ends = []

    class EndRecorder:
        @hookimpl
        def exchange_complete(self, flow):
            ends.append(("complete", flow.outcome))

        @hookimpl
        def exchange_error(self, flow, error):
            ends.append(("error", flow.outcome))

    _, client = await start(gateway_kit, plugins=(EndRecorder(),))
    async with client:
        await refusal(client, "acme")
    assert ends == [("error", "rejected")]


async def test_the_refusal_message_can_be_configured(gateway_kit):
    _, client = await start(gateway_kit, {"prompt_policy": {"words": ["acme"], "message": "Not here ({request_id})."}})
    async with client:
        error = await refusal(client, "acme")
    assert error.body["message"] == f"Not here ({error.request_id})."


async def test_an_invalid_pattern_is_a_config_error_naming_the_rule_and_file(gateway_kit):
    with pytest.raises(ConfigError, match=r"test-config\.toml: \[prompt_policy\] patterns\[1\] is not a valid"):
        await start(gateway_kit, {"prompt_policy": {"patterns": ["ok", "(unclosed"]}})


async def test_an_empty_word_is_a_config_error(gateway_kit):
    with pytest.raises(ConfigError, match=r"\[prompt_policy\] words\[0\] is empty"):
        await start(gateway_kit, {"prompt_policy": {"words": [" "]}})
