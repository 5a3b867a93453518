r"""A prompt policy: image prompts with deny-listed words or patterns are refused at the gateway.

    [plugins]
    modules = ["examples.prompt_policy.prompt_policy"]

    [prompt_policy]
    words = ["acme", "project falcon"]         # whole words or phrases, any case
    patterns = ['\b\d{3}-\d{2}-\d{4}\b']      # Python regular expressions, any case

A refused request gets the answer OpenAI's own safety system gives (contract 7.2): a 400 with
type ``image_generation_user_error`` and code ``moderation_blocked``, so apps handle both alike
(the SDK raises ``openai.BadRequestError`` with ``.code == "moderation_blocked"``). The check runs
in `check_request`: before the cache and before any upstream call, so a refused prompt costs nothing.
"""

from __future__ import annotations

import re
import unicodedata

import msgspec

from gatekeeper import hookimpl
from gatekeeper.config import Config as GatewayConfig
from gatekeeper.config import ConfigError
from gatekeeper.errors import GatewayError
from gatekeeper.flow import Flow
from gatekeeper.logs import get_logger
from gatekeeper.multipart import form_field

__all__ = ["Plugin", "PolicyConfig", "compile_policy"]

log = get_logger("examples.prompt_policy")

IMAGE_PROMPT_ROUTES = frozenset({"images/generations", "images/edits"})
DEFAULT_MESSAGE = ("Your request was rejected by this gateway's prompt policy. If you believe this is an error, "
                   "contact your gateway administrator and include the request ID {request_id}.")
# Invisible characters that would otherwise split a deny-listed word without changing how it reads.
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2060-\u2064\ufeff]")


class PolicyConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``[prompt_policy]`` section."""

    words: list[str] = []  # refused as whole words or phrases (any spacing), case-insensitively
    patterns: list[str] = []  # Python regular expressions searched anywhere in the prompt, case-insensitively
    message: str = DEFAULT_MESSAGE  # what the client reads; "{request_id}" is filled in


def compile_policy(settings: PolicyConfig, path: str) -> list[tuple[str, re.Pattern[str]]]:
    """Each rule compiled on its own, named as in the config; errors name the rule and the file."""
    rules = []
    for index, word in enumerate(settings.words):
        if not word.strip():
            raise ConfigError(f"{path}: [prompt_policy] words[{index}] is empty")
        # (?<!\w) / (?!\w) rather than \b: a rule like "c++" still has to stand alone.
        phrase = r"\s+".join(re.escape(piece) for piece in unicodedata.normalize("NFKC", word).split())
        rules.append((f"words[{index}]", re.compile(rf"(?<!\w){phrase}(?!\w)", re.IGNORECASE)))
    for index, pattern in enumerate(settings.patterns):
        try:
            rules.append((f"patterns[{index}]", re.compile(pattern, re.IGNORECASE)))
        except re.error as error:
            raise ConfigError(f"{path}: [prompt_policy] patterns[{index}] is not a valid regular expression: "
                              f"{error}") from None
    return rules


class Plugin:
    name = "prompt_policy"
    config_section = "prompt_policy"
    Config = PolicyConfig

    def __init__(self, config: GatewayConfig, settings: PolicyConfig) -> None:
        self.rules = compile_policy(settings, config.path)
        self.message = settings.message

    def describe(self) -> str:
        return f"refuses image prompts matching {len(self.rules)} rule(s)"

    @hookimpl
    def check_request(self, flow: Flow) -> None:
        if not self.rules or flow.method != "POST" or flow.route not in IMAGE_PROMPT_ROUTES:
            return
        prompt = _prompt_of(flow)
        if not prompt:
            return
        prompt = _INVISIBLE.sub("", unicodedata.normalize("NFKC", prompt))
        refused_by = next((name for name, rule in self.rules if rule.search(prompt)), None)
        if refused_by is None:
            return
        # The rule's name, not the matched text: a pattern may be there to catch personal data.
        log.info("prompt refused by policy", request_id=flow.request_id, tenant=flow.tenant, rule=refused_by)
        raise GatewayError(400, self.message.replace("{request_id}", flow.request_id),
                           type="image_generation_user_error", code="moderation_blocked")


def _prompt_of(flow: Flow) -> str | None:
    if flow.content_type == "multipart/form-data":
        return form_field(flow.headers.get("content-type", ""), flow.body, "prompt")
    request = flow.json
    prompt = request.get("prompt") if isinstance(request, dict) else None
    return prompt if isinstance(prompt, str) else None
