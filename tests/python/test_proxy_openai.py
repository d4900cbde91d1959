"""The correction proxy (`aligner serve --upstream URL --aligner-url URL ...`) through the
official `openai` Python client: a whole answer and a stream carry the Aligner's correction,
with the upstream's original answer in the `aligner_original` extension field.

    ALIGNER_PROXY_BASE_URL=http://127.0.0.1:8000/v1 python3 tests/python/test_proxy_openai.py

The Rust test runs it against a proxy whose upstream and Aligner are the loopback test server
(upstream model `mock-upstream`, Aligner `mock-aligner`), whose answers are predictable:
the upstream says "answer: <question>", the Aligner "I corrected this: <answer>".
The proxy requires the key in ALIGNER_PROXY_API_KEY (it is started with ALIGNER_API_KEYS):
the client sends it as a bearer token, and a client with another key gets a 401.
Needs `python3 -m pip install openai`.
"""
import os
import sys
import unittest

import openai

BASE_URL = os.environ.get("ALIGNER_PROXY_BASE_URL", "")

API_KEY = os.environ.get("ALIGNER_PROXY_API_KEY", "")

client = openai.OpenAI(base_url=BASE_URL, api_key=API_KEY or "not-checked", max_retries=0, timeout=60)

QUESTION = "What is the boiling point of water?"
ORIGINAL = "answer: " + QUESTION
CORRECTION = "I corrected this: " + ORIGINAL
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": QUESTION},
]


class ProxyOpenAI(unittest.TestCase):
    @unittest.skipUnless(API_KEY, "the proxy runs without keys")
    def test_another_key_is_refused(self):
        other = openai.OpenAI(base_url=BASE_URL, api_key="not-" + API_KEY, max_retries=0, timeout=60)
        with self.assertRaises(openai.AuthenticationError) as caught:
            other.chat.completions.create(model="m", messages=MESSAGES)
        self.assertEqual(caught.exception.status_code, 401)
        self.assertEqual(caught.exception.code, "invalid_api_key")

    def test_whole_answer(self):
        r = client.chat.completions.create(model="anything", messages=MESSAGES, temperature=0)
        self.assertTrue(r.id.startswith("chatcmpl-"), r.id)
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.model, "mock-upstream")
        self.assertEqual(len(r.choices), 1)
        message = r.choices[0].message
        self.assertEqual(message.role, "assistant")
        self.assertEqual(message.content, CORRECTION)
        # Extension fields survive in the client's models.
        self.assertEqual(message.model_extra["aligner_original"], ORIGINAL)
        self.assertEqual(r.model_extra["aligner"]["original"], ORIGINAL)
        self.assertEqual(r.model_extra["aligner"]["aligner_model"], "mock-aligner")
        self.assertEqual(r.model_extra["aligner"]["template"], "aligner-v1")
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertGreater(r.usage.prompt_tokens, 0)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens)

    def test_raw_response_has_server_timing(self):
        raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        timing = raw.headers.get("server-timing")
        self.assertIn("upstream;dur=", timing)
        self.assertIn("aligner;dur=", timing)
        self.assertEqual(raw.parse().choices[0].message.content, CORRECTION)

    def test_stream(self):
        stream = client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        self.assertTrue(all(c.object == "chat.completion.chunk" for c in chunks))
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        self.assertEqual(chunks[0].choices[0].delta.model_extra["aligner_original"], ORIGINAL)
        with_choices = [c for c in chunks if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in with_choices)
        self.assertEqual(text, CORRECTION)
        finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
        self.assertEqual(finishes, ["stop"])
        self.assertIsNotNone(chunks[-1].usage)
        self.assertGreater(chunks[-1].usage.completion_tokens, 0)

    def test_errors(self):
        with self.assertRaises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="m", messages=MESSAGES, temperature=5)
        self.assertEqual(caught.exception.body["param"], "temperature")
        with self.assertRaises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="m", messages=[])
        self.assertIn("messages", caught.exception.message)
        with self.assertRaises(openai.NotFoundError):
            client.completions.create(model="m", prompt="not served by the proxy")


if __name__ == "__main__":
    if not BASE_URL:
        sys.exit("set ALIGNER_PROXY_BASE_URL (e.g. http://127.0.0.1:8000/v1)")
    unittest.main(argv=sys.argv[:1], verbosity=2)
