"""`aligner serve` through the official `openai` Python client: models list, chat, completions,
streaming, seeds, the top_k / repetition_penalty extensions, and error answers.

    ALIGNER_SERVE_BASE_URL=http://127.0.0.1:8000/v1 ALIGNER_SERVE_MODEL=NAME \
        python3 tests/python/test_serve_openai.py

Model-agnostic: the Rust tests run it against a test-double generator and against the real
SmolLM2 GGUF. Needs `python3 -m pip install openai`.
"""
import os
import sys
import unittest

import openai

BASE_URL = os.environ.get("ALIGNER_SERVE_BASE_URL", "")
MODEL = os.environ.get("ALIGNER_SERVE_MODEL", "")
MAX_TOKENS = 16

client = openai.OpenAI(base_url=BASE_URL, api_key="not-checked", max_retries=0, timeout=120)

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name three colours."},
]


def chat_text(**kwargs) -> str:
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, **kwargs
    )
    return response.choices[0].message.content


class ServeOpenAI(unittest.TestCase):
    def test_models_list(self):
        models = client.models.list()
        self.assertEqual([m.id for m in models.data], [MODEL])
        self.assertEqual(models.data[0].object, "model")
        self.assertEqual(client.models.retrieve(MODEL).id, MODEL)

    def test_chat(self):
        r = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
        )
        self.assertTrue(r.id.startswith("chatcmpl-"), r.id)
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.model, MODEL)
        self.assertEqual(len(r.choices), 1)
        choice = r.choices[0]
        self.assertEqual(choice.index, 0)
        self.assertEqual(choice.message.role, "assistant")
        self.assertIsInstance(choice.message.content, str)
        self.assertTrue(choice.message.content.strip(), "empty answer")
        self.assertIn(choice.finish_reason, ("stop", "length"))
        self.assertGreater(r.usage.prompt_tokens, 0)
        self.assertGreater(r.usage.completion_tokens, 0)
        self.assertLessEqual(r.usage.completion_tokens, MAX_TOKENS)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens)

    def test_chat_reports_the_served_model_name(self):
        r = client.chat.completions.create(
            model="some-other-name", messages=MESSAGES, max_tokens=4, temperature=0
        )
        self.assertEqual(r.model, MODEL)

    def test_completions(self):
        r = client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=MAX_TOKENS, temperature=0
        )
        self.assertTrue(r.id.startswith("cmpl-"), r.id)
        self.assertEqual(r.object, "text_completion")
        self.assertEqual(r.model, MODEL)
        self.assertEqual(len(r.choices), 1)
        self.assertIsInstance(r.choices[0].text, str)
        self.assertTrue(r.choices[0].text, "empty completion")
        self.assertIn(r.choices[0].finish_reason, ("stop", "length"))
        self.assertGreater(r.usage.prompt_tokens, 0)

    def test_streaming_chat_equals_the_whole_answer(self):
        whole = chat_text(temperature=0, seed=3)
        stream = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            temperature=0,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        self.assertGreater(len(chunks), 2)
        self.assertTrue(all(c.object == "chat.completion.chunk" for c in chunks))
        self.assertTrue(all(c.model == MODEL for c in chunks))
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        with_choices = [c for c in chunks if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in with_choices)
        self.assertEqual(text, whole)
        finishes = [c.choices[0].finish_reason for c in with_choices if c.choices[0].finish_reason]
        self.assertEqual(len(finishes), 1)
        self.assertIn(finishes[0], ("stop", "length"))
        self.assertEqual(with_choices[-1].choices[0].finish_reason, finishes[0])
        self.assertIsNotNone(chunks[-1].usage)
        self.assertGreater(chunks[-1].usage.completion_tokens, 0)

    def test_streaming_completions(self):
        stream = client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks)
        self.assertTrue(text, "nothing streamed")
        self.assertIn(chunks[-1].choices[0].finish_reason, ("stop", "length"))

    def test_same_seed_same_text(self):
        first = chat_text(temperature=1.0, seed=1234)
        second = chat_text(temperature=1.0, seed=1234)
        self.assertEqual(first, second)

    def test_n_choices(self):
        r = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=7, n=2
        )
        self.assertEqual([c.index for c in r.choices], [0, 1])
        # Choice i has seed + i, so choice 0 of n=2 repeats a single request with the same seed.
        self.assertEqual(
            r.choices[0].message.content,
            client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=7
            ).choices[0].message.content,
        )

    def test_stop_and_extensions(self):
        r = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=MAX_TOKENS,
            temperature=0.7,
            top_p=0.9,
            seed=1,
            stop=["\n", "."],
            frequency_penalty=0.5,
            extra_body={"top_k": 10, "repetition_penalty": 1.1},
        )
        content = r.choices[0].message.content
        self.assertNotIn("\n", content)
        self.assertNotIn(".", content)

    def test_errors(self):
        with self.assertRaises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=5)
        self.assertEqual(caught.exception.status_code, 400)
        self.assertIn("temperature", caught.exception.message)
        self.assertEqual(caught.exception.body["type"], "invalid_request_error")
        self.assertEqual(caught.exception.body["param"], "temperature")
        with self.assertRaises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=[])
        self.assertIn("messages", caught.exception.message)
        with self.assertRaises(openai.NotFoundError):
            client.embeddings.create(model=MODEL, input="no embeddings here")


if __name__ == "__main__":
    if not BASE_URL or not MODEL:
        sys.exit("set ALIGNER_SERVE_BASE_URL (e.g. http://127.0.0.1:8000/v1) and ALIGNER_SERVE_MODEL")
    unittest.main(argv=sys.argv[:1], verbosity=2)
