"""Images through the HTTP API's ``/v1/chat/completions``: the real app on a real port, the
official openai SDK as the client, the fake OpenAI server as the upstream.

A user message's ``image_url`` parts (data URLs) reach a model that sees images as content
parts, decoded, checked and scaled (``modules.core.images``); what the upstream gets is decoded
again here and compared pixel for pixel. Remote URLs, data URLs that are not base64 images,
images for a model that cannot see them: a 400 naming the part, and no upstream request.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import openai
import pytest
from PIL import Image as PILImage

from tests.conftest import fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer

API_KEY = "img-test-key-0123456789abcdef"
WAIT = 15.0
REMOTE = "remote image URLs are not fetched; send the image as a data URL"


def png(width: int = 40, height: int = 30) -> bytes:
    """A PNG with a pattern (each pixel its own colour, so a wrong or shuffled image shows)."""
    image = PILImage.new("RGB", (width, height))
    image.putdata([((x * 7) % 256, (y * 11) % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def pixels(data: bytes) -> tuple[tuple[int, int], list[Any]]:
    with PILImage.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
        return rgb.size, list(rgb.getdata())


def image_part(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


@pytest.fixture
def app(fake_openai: FakeOpenAIServer, launch_app) -> tuple[FakeOpenAIServer, openai.OpenAI]:
    """The app with the API on: 'seer' sees images (gpt-4o upstream), 'blind' does not."""
    url = launch_app({"models": [fake_model_entry(fake_openai, name="seer", model="gpt-4o"),
                                 fake_model_entry(fake_openai, name="blind", model="fake-model")],
                      "api": {"enabled": True, "keys": [API_KEY]}}).rstrip("/")
    return fake_openai, openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=WAIT)


def refused(client: openai.OpenAI, messages: list[dict[str, Any]], model: str = "seer") -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=messages)
    return info.value


# -- images that reach the model --------------------------------------------------------------------------
def test_the_sdks_image_message_reaches_the_upstream_as_parts(app):
    fake, client = app
    picture = png()
    fake.enqueue("A ", "pattern.")
    result = client.chat.completions.create(model="seer", messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": data_url(picture)}}]}])
    assert result.choices[0].message.content == "A pattern."
    [sent] = fake.requests[-1].body["messages"]
    assert sent["role"] == "user"
    assert sent["content"][0] == {"type": "text", "text": "What is this?"}
    assert [part["type"] for part in sent["content"]] == ["text", "image_url"]
    assert sent["content"][1]["image_url"]["detail"] == "auto"
    [received] = fake.requests[-1].images()
    assert received.mime == "image/png"
    assert pixels(received.data) == pixels(picture)


def test_streamed_with_several_images_an_image_only_question_and_history(app):
    fake, client = app
    first, second, third = png(10, 10), png(20, 12), png(12, 20)
    fake.enqueue("Three", " patterns.")
    stream = client.chat.completions.create(model="seer", stream=True, messages=[
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, image_part(data_url(first), detail="low")]},
        {"role": "assistant", "content": "A small pattern."},
        {"role": "user", "content": [image_part(data_url(second)), image_part(data_url(third), detail="high")]}])
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == "Three patterns."
    messages = fake.requests[-1].body["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "A small pattern."
    assert [p["type"] for p in messages[0]["content"]] == ["text", "image_url"]
    assert [p["type"] for p in messages[2]["content"]] == ["image_url", "image_url"]  # no empty text part
    received = fake.requests[-1].images()
    assert [(r.message, r.part) for r in received] == [(0, 1), (2, 0), (2, 1)]
    assert [pixels(r.data) for r in received] == [pixels(first), pixels(second), pixels(third)]


def test_a_large_image_is_scaled_to_the_models_limit_before_it_is_sent(app):
    fake, client = app
    fake.enqueue("Wide.")
    client.chat.completions.create(model="seer", messages=[{"role": "user", "content": [
        {"type": "text", "text": "?"}, image_part(data_url(png(3000, 1000)))]}])
    [received] = fake.requests[-1].images()
    with PILImage.open(io.BytesIO(received.data)) as image:
        width, height = image.size
    assert max(width, height) <= 2048 and min(width, height) <= 768, (width, height)
    assert abs(width / height - 3.0) < 0.05  # the shape kept


def test_base64_wrapped_over_lines_is_still_an_image(app):
    fake, client = app
    picture = png()
    encoded = base64.encodebytes(picture).decode()  # 76 characters a line
    fake.enqueue("ok")
    client.chat.completions.create(model="seer", messages=[{"role": "user", "content": [
        {"type": "text", "text": "?"}, image_part("data:image/png;base64," + encoded)]}])
    assert pixels(fake.requests[-1].images()[0].data) == pixels(picture)


# -- refusals: a 400 naming the part, nothing sent upstream -------------------------------------------------
def test_a_remote_image_url_is_refused_not_fetched(app):
    fake, client = app
    error = refused(client, [{"role": "user", "content": [
        {"type": "text", "text": "?"}, image_part("https://example.org/cat.png")]}])
    assert REMOTE in error.message
    assert "messages[0].content[1]" in error.message
    assert error.body["param"] == "messages[0].content"
    assert fake.requests == []


@pytest.mark.parametrize("url, words", [
    ("data:image/png," + base64.b64encode(png()).decode(), "not base64"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("data:image/png;base64,%%%%", "does not decode"),
    ("data:image/png;base64,", "empty"),
    ("data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode(), "not an image the app can use"),
    ("cat.png", "not a data URL"),
], ids=["not-base64", "not-an-image-type", "bad-base64", "empty", "not-an-image", "not-a-url"])
def test_a_data_url_that_is_not_a_base64_image_is_refused_naming_the_part(app, url, words):
    fake, client = app
    error = refused(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "?"}, image_part(data_url(png())), image_part(url)]}])
    assert "messages[1].content[2]" in error.message, error.message
    assert words in error.message, error.message
    assert error.body["param"] == "messages[1].content"
    assert fake.requests == []


def test_a_model_that_cannot_see_images_refuses_them(app):
    fake, client = app
    error = refused(client, [{"role": "user", "content": [{"type": "text", "text": "?"},
                                                           image_part(data_url(png()))]}], model="blind")
    assert "model 'blind' cannot see images" in error.message
    assert error.body["param"] == "messages[0].content"
    assert fake.requests == []
    fake.enqueue("Hello.")  # the same model, text only: answered
    result = client.chat.completions.create(model="blind", messages=[{"role": "user", "content": "Hi"}])
    assert result.choices[0].message.content == "Hello."


def test_an_image_on_an_assistant_message_is_refused(app):
    fake, client = app
    error = refused(client, [{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": [image_part(data_url(png()))]},
                             {"role": "user", "content": "Again"}])
    assert "messages[1].content[0]" in error.message and "only user messages" in error.message
    assert fake.requests == []


def test_an_unknown_detail_is_refused(app):
    fake, client = app
    error = refused(client, [{"role": "user", "content": [image_part(data_url(png()), detail="huge")]}])
    assert "detail" in error.message
    assert fake.requests == []


def test_an_image_url_part_without_image_url_is_refused(app):
    fake, client = app
    error = refused(client, [{"role": "user", "content": [{"type": "text", "text": "?"}, {"type": "image_url"}]}])
    assert "messages[0].content[1] is an image_url part without image_url" in error.message
    assert fake.requests == []
