"""The sample app of docker-compose.yml: an ordinary openai SDK program. The only sign of the
gateway is the environment: OPENAI_BASE_URL points at it and OPENAI_API_KEY is a gateway key."""

from __future__ import annotations

import base64
import sys

import openai

PROMPT = "a lighthouse at dawn, flat vector illustration"


def main() -> int:
    client = openai.OpenAI(max_retries=2)  # reads OPENAI_BASE_URL and OPENAI_API_KEY
    for attempt in ("first", "second"):
        raw = client.images.with_raw_response.generate(model="gpt-image-1-mini", prompt=PROMPT, quality="low")
        result = raw.parse()
        image = base64.b64decode(result.data[0].b64_json or "")
        print(f"{attempt} call: {len(image)} image bytes, {result.usage.total_tokens} tokens, "
              f"cache {raw.headers.get('x-gatekeeper-cache')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
