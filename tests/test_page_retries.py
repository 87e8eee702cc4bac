"""A silent upstream, seen from the page: the reply says "retrying (2/3)…" where its text will come,
and the wait is bounded.

The real app through gradio_client's ``/respond`` (what the page calls), against the fake
OpenAI server told to accept requests and never answer (``stall``), with a short
first-byte timeout. Waits are on job outputs, bounded.
"""

from __future__ import annotations

from tests.conftest import fake_model_entry
from tests.test_app_api import wait_until
from tests.test_app_history import MODEL, NEUTRAL, SYSTEM, Session, message_text, sessions  # noqa: F401


def test_the_reply_says_retrying_while_a_silent_server_is_tried_again(fake_openai, launch_app, sessions):
    entry = fake_model_entry(fake_openai, MODEL, max_retries=2, first_byte_timeout=0.3, retry_budget=20)
    url = launch_app({"models": [entry]})
    page = sessions(url)
    fake_openai.enqueue(stall=True)
    fake_openai.enqueue(stall=True)
    fake_openai.enqueue("Third time lucky.")
    page.add("Hello?")
    job = page.client.submit(MODEL, SYSTEM, *NEUTRAL, api_name="/respond")
    wait_until(job.done, "the reply", timeout=30)
    shown = [message_text(chatbot[-1]) for chatbot in job.outputs() if chatbot and chatbot[-1]["role"] == "assistant"]
    assert any("retrying (2/3)" in s for s in shown), shown
    assert any("retrying (3/3)" in s for s in shown), shown
    assert shown[-1].startswith("Third time lucky.") and "retrying" not in shown[-1]
    assert len(fake_openai.requests) == 3


def test_a_server_that_never_answers_fails_within_the_budget(fake_openai, launch_app, sessions):
    entry = fake_model_entry(fake_openai, MODEL, max_retries=2, first_byte_timeout=0.3, retry_budget=2)
    url = launch_app({"models": [entry]})
    page: Session = sessions(url)
    for _ in range(3):
        fake_openai.enqueue(stall=True)
    page.add("Hello?")
    chatbot = page.respond()
    assert "did not answer in time" in message_text(chatbot[-1])
    assert chatbot[0]["role"] == "user" and message_text(chatbot[0]) == "Hello?"  # the question stays
    assert 1 <= len(fake_openai.requests) <= 3
