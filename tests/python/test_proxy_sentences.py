"""Sentence-by-sentence correction (`aligner serve --upstream URL --stream-correction sentence`)
through the official `openai` Python client, streaming: corrected words arrive while the
upstream is still writing, and an upstream that breaks off mid-answer ends the stream with an
error the client raises, after the sentences corrected so far.

    ALIGNER_PROXY_BASE_URL=http://127.0.0.1:8000/v1 \
    ALIGNER_BROKEN_PROXY_BASE_URL=http://127.0.0.1:8001/v1 \
    python3 tests/python/test_proxy_sentences.py

The Rust test runs it against two proxies whose upstream and Aligner are the loopback test
server: the upstream streams "answer: <question>" one word per event, 80 ms apart (the broken
one stops after six words without finishing), and the Aligner's correction of a sentence is the
sentence in capitals. Needs `python3 -m pip install openai`.
"""
import os
import time
import unittest

import openai

QUESTION = "Boil the water. Add the egg. Wait nine minutes. Cool it in cold water."
ANSWER = "answer: " + QUESTION
MESSAGES = [{"role": "user", "content": QUESTION}]


def client(var):
    return openai.OpenAI(base_url=os.environ[var], api_key="not-checked", max_retries=0, timeout=60)


class SentenceCorrection(unittest.TestCase):
    def test_stream_arrives_sentence_by_sentence(self):
        start = time.monotonic()
        stream = client("ALIGNER_PROXY_BASE_URL").chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        text, first, finishes, usage = "", None, [], None
        for chunk in stream:
            self.assertEqual(chunk.object, "chat.completion.chunk")
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    if first is None:
                        first = time.monotonic() - start
                    text += choice.delta.content
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
        total = time.monotonic() - start
        self.assertEqual(text, ANSWER.upper())
        self.assertEqual(finishes, ["stop"])
        self.assertIsNotNone(usage)
        self.assertGreater(usage.completion_tokens, 0)
        # 14 words 80 ms apart: the first sentence (4 words) is corrected long before the end.
        self.assertLess(first, total / 2, (first, total))

    def test_an_upstream_that_breaks_off_ends_the_stream_with_an_error(self):
        stream = client("ALIGNER_BROKEN_PROXY_BASE_URL").chat.completions.create(
            model="m", messages=MESSAGES, stream=True
        )
        text = ""
        with self.assertRaises(openai.APIError) as caught:
            for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
        self.assertEqual(text, "ANSWER: BOIL THE WATER. ")
        self.assertIn("broke off mid-answer", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
