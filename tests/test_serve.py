"""The Ray Serve OpenAI-compatible app over real HTTP, with the official `openai` client.

One Serve instance on a free port of the session's Ray cluster hosts three applications:
- "/": SmolLM2 (HF engine, dynamic batching) beside tiny-llama and a LoRA adapter of it,
  behind the API key `LMFLOW_RAY_TEST_API_KEY` (set in conftest before Ray starts);
- "/tinyqueue": tiny-llama with a queue of one running + one waiting request (overload);
- "/vllm": SmolLM2 on the vLLM engine (continuous batching);
- "/vlm": the vision-language model of conftest.vlm_runs (images as data: URLs, at most 8 KiB each).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import pytest
from conftest import TEST_API_KEY, free_port, random_lora

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama, tmp_path_factory):
    """A LoRA adapter of tiny-llama with random B matrices (so it changes the output)."""
    return random_lora(tiny_llama, tmp_path_factory.mktemp("adapter") / "tiny-lora")


@pytest.fixture(scope="module")
def smol_adapter(smollm2, tmp_path_factory):
    return random_lora(smollm2, tmp_path_factory.mktemp("adapter") / "smol-lora")


@pytest.fixture(scope="module")
def server(request, ray_session, smollm2, tiny_llama, tiny_adapter, smol_adapter):
    from ray import serve

    from lmflow_ray.serve.app import build
    from lmflow_ray.serve.config import parse_serve_config

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    main = parse_serve_config({
        "api_key_env": "LMFLOW_RAY_TEST_API_KEY",
        "models": [
            {"name": "smollm2", "path": str(smollm2), "max_batch_size": 16, "max_tokens_limit": 512,
             "torch_threads": 1},
            {"name": "tiny", "path": str(tiny_llama), "adapters": {"tiny-lora": str(tiny_adapter)}, "num_cpus": 0.5,
             "torch_threads": 1},
        ]})
    tiny_queue = parse_serve_config({"api_key_env": "UNSET_KEY_VAR", "models": [
        {"name": "tiny", "path": str(tiny_llama), "max_batch_size": 1, "max_ongoing_requests": 1,
         "max_queued_requests": 1, "num_cpus": 0.5, "torch_threads": 1}]})
    vllm = parse_serve_config({"api_key_env": "UNSET_KEY_VAR", "models": [
        {"name": "smollm2", "path": str(smollm2), "engine": "vllm", "max_model_len": 1024, "kv_cache_gb": 1,
         "adapters": {"smol-lora": str(smol_adapter)}}]})
    try:
        for name, cfg, prefix in [("main", main, "/"), ("tinyqueue", tiny_queue, "/tinyqueue"), ("vllm", vllm, "/vllm")]:
            serve.run(build(cfg), name=name, route_prefix=prefix, blocking=False)
        # The VLM's two tuning runs (when no earlier test made them) go on while those replicas load.
        vlm_runs = request.getfixturevalue("vlm_runs")
        vlm = parse_serve_config({"api_key_env": "UNSET_KEY_VAR", "models": [
            {"name": "shapes-vlm", "path": str(vlm_runs["stage2"]), "num_cpus": 0.5, "torch_threads": 1,
             "max_image_bytes": 8192}]})
        serve.run(build(vlm), name="vlm", route_prefix="/vlm", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:  # also when the VLM runs fail: no replicas left holding the session cluster
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=300)


def _chat(client, model="smollm2", **kw):
    return client.chat.completions.create(model=model, messages=QUESTION, **{"max_tokens": 24, "temperature": 0, **kw})


# ----------------------------------------------------------------------------- openai client


def test_chat_and_completion(client):
    r = _chat(client)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10
    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in c.choices[0].text and c.usage.completion_tokens == 8 and c.choices[0].finish_reason == "length"


def test_streaming_chat_arrives_in_pieces_before_the_end(client):
    full = _chat(client, max_tokens=32).choices[0].message.content
    t0, arrivals, pieces = time.time(), [], []
    stream = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=32, temperature=0, stream=True)
    finish = None
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.delta.content:
            pieces.append(choice.delta.content)
            arrivals.append(time.time() - t0)
        finish = choice.finish_reason or finish
    assert "".join(pieces) == full
    assert len(pieces) >= 3 and finish == "stop"
    # Tokens arrive over time, not all at once at the end.
    assert arrivals[-1] - arrivals[0] > 0.05, arrivals

    # stream_options.include_usage: one more chunk, without choices, holding the counts of the whole answer.
    whole = _chat(client, max_tokens=32)
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=32, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens"}) == \
        whole.usage.model_dump(include={"prompt_tokens", "completion_tokens"})
    assert all(c.usage is None for c in chunks[:-1])


def test_ignore_eos_generates_max_tokens(client):
    """vLLM's extension, which serving benchmarks send: the answer goes on past the end-of-sequence token."""
    short = _chat(client, max_tokens=40)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 40
    long = _chat(client, max_tokens=40, extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 40
    assert long.choices[0].message.content.startswith(short.choices[0].message.content)


def test_n_choices_seed_and_stop(client):
    r = _chat(client, n=3, temperature=1.0, seed=7, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1, 2] and all(c.message.content for c in r.choices)
    again = _chat(client, n=3, temperature=1.0, seed=7, max_tokens=12)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    full = _chat(client).choices[0].message.content
    cut = _chat(client, stop=["Paris"]).choices[0]
    assert cut.message.content == full[: full.index("Paris")] and cut.finish_reason == "stop"


def test_models_are_listed_and_routed_by_model_field(client, tiny_llama, tiny_adapter):
    from lmflow_ray.inference import SamplingParams, make_engine

    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"smollm2", "tiny", "tiny-lora"}
    assert listed["tiny-lora"].model_extra["parent"] == "tiny"
    params = SamplingParams(max_tokens=12)
    for model, path in [("tiny", tiny_llama), ("tiny-lora", tiny_adapter)]:
        got = client.completions.create(model=model, prompt="the cat sat", max_tokens=12, temperature=0).choices[0].text
        assert got == make_engine("hf", path).generate(["the cat sat"], params)[0][0].text, model
    base = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=12, temperature=0)
    lora = client.completions.create(model="tiny-lora", prompt="the cat sat", max_tokens=12, temperature=0)
    assert base.choices[0].text != lora.choices[0].text


@pytest.mark.parametrize("prefix", ["", "/vllm"], ids=["hf", "vllm"])
def test_logprobs_with_top_alternatives(server, prefix):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}{prefix}/v1", api_key=TEST_API_KEY, max_retries=0, timeout=300)
    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0,
                                  logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # Greedy: the sampled token is the most likely one, so the 2 alternatives include it.
        assert len(top) == 2 and top[token] == pytest.approx(chosen, abs=1e-4) and max(top.values()) <= chosen + 1e-4
    r = _chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(x.token for x in content) == r.choices[0].message.content
    for x in content:
        assert len(x.top_logprobs) == 3 and x.top_logprobs[0].token == x.token
        assert x.top_logprobs[0].logprob == pytest.approx(x.logprob, abs=1e-4)
        assert [a.logprob for a in x.top_logprobs] == sorted((a.logprob for a in x.top_logprobs), reverse=True)
    plain = _chat(client, max_tokens=3, logprobs=True).choices[0].logprobs.content
    assert plain and all(x.top_logprobs == [] and x.logprob <= 0 for x in plain)


LOGPROB_BAD = [
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 100}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_logprobs": 2}, None),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize("route,body,param", LOGPROB_BAD, ids=[f"{r}-{json.dumps(b)[-28:]}" for r, b, _ in LOGPROB_BAD])
def test_out_of_range_logprobs_and_non_boolean_flags_get_400(server, route, body, param):
    r = httpx.post(f"{server}/vllm{route}", json={"model": "smollm2", "max_tokens": 2, **body}, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    if param is None:
        assert err["message"] == "top_logprobs needs logprobs: true"


def test_body_that_is_not_a_json_object_is_named(server):
    url = f"{server}/vllm/v1/chat/completions"
    body = json.dumps({"model": "smollm2", "messages": QUESTION})
    r = httpx.post(url, content=body, headers={"Content-Type": "text/plain"}, timeout=60)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "Content-Type: application/json" in msg and "'text/plain'" in msg and "None" not in msg
    r = httpx.post(url, data={"model": "smollm2"}, timeout=60)  # a form body
    assert r.status_code == 400 and "'application/x-www-form-urlencoded'" in r.json()["error"]["message"]
    r = httpx.post(url, json=[{"model": "smollm2", "messages": QUESTION}], timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "the request body must be a JSON object with the request's fields, got an array"


def test_serving_on_a_cluster_that_already_serves_replaces_nothing(server):
    from lmflow_ray.errors import UserError
    from lmflow_ray.serve.app import run_server
    from lmflow_ray.serve.config import parse_serve_config

    port = int(server.rsplit(":", 1)[1])
    cfg = parse_serve_config({"models": [{"path": "tiny-llama"}]})
    with pytest.raises(UserError, match="already serves an application 'main'"):
        run_server(cfg, port=port, name="main", blocking=False)
    with pytest.raises(UserError, match=f"Serve already runs on this Ray cluster with HTTP on port {port}"):
        run_server(cfg, port=free_port(), name="other", blocking=False)
    with pytest.raises(UserError, match="route prefix /vllm is taken by application 'vllm'"):
        run_server(cfg, port=port, name="other", route_prefix="/vllm", blocking=False)
    assert httpx.get(f"{server}/health").status_code == 200  # nothing was replaced


# ----------------------------------------------------------------------------- errors, auth


BAD = [
    ("invalid JSON", b'{"model": "smollm2", "messages": [', 400, None),
    ("unknown model", {"model": "gpt-9", "messages": QUESTION}, 404, "model"),
    ("missing messages", {"model": "smollm2"}, 400, "messages"),
    ("wrong type", {"model": "smollm2", "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    ("messages not a list", {"model": "smollm2", "messages": "hi"}, 400, "messages"),
    ("max_tokens 0", {"model": "smollm2", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over the limit", {"model": "smollm2", "messages": QUESTION, "max_tokens": 100000}, 400, "max_tokens"),
    ("prompt longer than the context", {"model": "smollm2", "messages": [{"role": "user", "content": "word " * 9000}]},
     400, "messages"),
    ("unknown role", {"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("n too large", {"model": "smollm2", "messages": QUESTION, "n": 1000}, 400, "n"),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_openai_error_and_server_keeps_serving(server, what, body, status, param):
    headers = {"Authorization": f"Bearer {TEST_API_KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server}/v1/chat/completions", content=data, headers=headers, timeout=120)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param, err
    ok = httpx.post(f"{server}/v1/chat/completions", headers=headers, timeout=120,
                    json={"model": "tiny", "messages": QUESTION, "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_api_key_is_checked_except_on_health(server):
    assert httpx.get(f"{server}/health").status_code == 200
    r = httpx.get(f"{server}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {TEST_API_KEY}"}).status_code == 200
    # The other apps have no key configured: open.
    assert httpx.get(f"{server}/tinyqueue/v1/models").status_code == 200


# ----------------------------------------------------------------------------- load


async def _fire(url: str, bodies: list[dict], headers: dict | None = None) -> list[tuple[int, float, dict]]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(bodies))) as c:
        async def one(body):
            t0 = time.perf_counter()
            r = await c.post(url, json=body, headers=headers)
            return r.status_code, time.perf_counter() - t0, r.json()

        return await asyncio.gather(*(one(b) for b in bodies))


def test_64_concurrent_chats_all_succeed(server):
    prompts = [f"Name a fruit that is {c}." for c in ("red", "yellow", "green", "orange")] * 16
    bodies = [{"model": "smollm2", "messages": [{"role": "user", "content": p}], "max_tokens": 12, "temperature": 0}
              for p in prompts]
    t0 = time.perf_counter()
    results = asyncio.run(_fire(f"{server}/v1/chat/completions", bodies, {"Authorization": f"Bearer {TEST_API_KEY}"}))
    wall = time.perf_counter() - t0
    assert [s for s, _, _ in results] == [200] * 64, [r for r in results if r[0] != 200][:2]
    # Same prompt, greedy: the same answer whichever batch it landed in.
    texts = [r[2]["choices"][0]["message"]["content"] for r in results]
    for i in range(4):
        assert len({texts[j] for j in range(i, 64, 4)}) == 1, texts[i::4]
    lat = sorted(t for _, t, _ in results)
    print(f"\n64 concurrent chats: {64 / wall:.2f} req/s, p50 {statistics.median(lat):.2f} s, p99 {lat[-1]:.2f} s")


def test_overload_gets_503_not_a_hang(server):
    bodies = [{"model": "tiny", "messages": QUESTION, "max_tokens": 64, "temperature": 0}] * 64
    results = asyncio.run(_fire(f"{server}/tinyqueue/v1/chat/completions", bodies))
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    refused = next(b for s, _, b in results if s == 503)
    assert refused["error"]["type"] == "overloaded_error"
    # Refusals are immediate, and the server is fine afterwards.
    assert min(t for s, t, _ in results if s == 503) < 5
    r = httpx.post(f"{server}/tinyqueue/v1/chat/completions", json=bodies[0], timeout=120)
    assert r.status_code == 200


# ----------------------------------------------------------------------------- vLLM engine


def test_vllm_app_chat_stream_and_n(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/vllm/v1", api_key="none", max_retries=0, timeout=300)
    r = _chat(client)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=24, temperature=0, stream=True) if c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == r.choices[0].message.content
    many = _chat(client, n=2, temperature=1.0, seed=3, max_tokens=8)
    assert len(many.choices) == 2
    chunks = list(client.completions.create(model="smollm2", prompt="Hello", max_tokens=40, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 40 and chunks[-2].choices[0].finish_reason == "length"
    # The adapter served beside the base by the same engine (a vLLM LoRA request) changes the answer.
    tuned = _chat(client, model="smol-lora")
    assert tuned.model == "smol-lora" and tuned.choices[0].message.content != r.choices[0].message.content
    # Concurrent requests share the running batch (continuous batching): 16 at once all succeed.
    bodies = [{"model": "smollm2", "messages": QUESTION, "max_tokens": 8, "temperature": 0}] * 16
    results = asyncio.run(_fire(f"{server}/vllm/v1/chat/completions", bodies))
    assert [s for s, _, _ in results] == [200] * 16
    assert len({b["choices"][0]["message"]["content"] for _, _, b in results}) == 1


def test_killed_vllm_replica_leaves_no_engine_core(server):
    """vLLM's engine core runs in a process of its own beside the replica: when the replica is killed
    (SIGKILL, as a dying node or Serve's forced stop ends it), that process goes too. Runs last: it
    removes the vLLM application."""
    import os
    import signal

    import psutil
    from ray import serve

    cores = [p for p in psutil.process_iter(["cmdline"]) if "VLLM::EngineCore" in " ".join(p.info["cmdline"] or [])]
    replica = {p.ppid() for p in cores}
    assert len(cores) == 1 and len(replica) == 1, [p.info for p in cores]  # the vLLM app's one replica
    os.kill(replica.pop(), signal.SIGKILL)
    serve.delete("vllm")  # no replacement replica
    _, alive = psutil.wait_procs(cores, timeout=30)
    assert not alive, [p.pid for p in alive]


# ----------------------------------------------------------------------------- images (vision-language model)


def _data_url(image, fmt: str = "PNG") -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _image_message(url: str, text: str = "What colour is the shape?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


def test_vlm_names_the_colour_of_an_image_sent_as_a_data_url(server, vlm_runs):
    from openai import OpenAI
    from PIL import Image

    from lmflow_ray.inference import SamplingParams, make_engine

    client = OpenAI(base_url=f"{server}/vlm/v1", api_key="unused", max_retries=0, timeout=300)
    held = json.loads(vlm_runs["heldout"].read_text())["instances"][:6]
    local = make_engine("hf", str(vlm_runs["stage2"]))
    named = 0
    for x in held:
        image = Image.open(vlm_runs["data"] / x["image"]).convert("RGB")
        fmt = "JPEG" if held.index(x) % 2 else "PNG"
        r = client.chat.completions.create(model="shapes-vlm", messages=_image_message(_data_url(image, fmt)),
                                           max_tokens=4, temperature=0)
        answer = r.choices[0].message.content
        named += x["colour"] in answer
        if fmt == "PNG":  # the same pixels as in-process generation (a JPEG's are not)
            [[mine]] = local.chat([[{"role": "user", "content": "<image>\nWhat colour is the shape?"}]],
                                  SamplingParams(max_tokens=4), images=[[image]])
            assert answer == mine.text, (answer, mine.text)
        # the image's 16 feature positions count as prompt tokens (its placeholder token among them)
        text = local.chat_prompt([{"role": "user", "content": "<image>\nWhat colour is the shape?"}])
        assert r.usage.prompt_tokens == len(local.tokenizer(text, add_special_tokens=False)["input_ids"]) + 15
    assert named >= 4, named  # held-out accuracy measured ~0.8 (test_vlm.py); chance is 1/6


@pytest.mark.parametrize("url, expected", [
    ("https://example.com/cat.png", "remote image URLs are not fetched by this server"),
    ("data:image/png;base64,%%%notbase64", "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "not an image PIL can read"),
    ("big", "above this server's limit of 8192"),
])
def test_bad_images_are_400s_that_say_why(server, url, expected):
    import numpy as np
    from openai import BadRequestError, OpenAI
    from PIL import Image

    if url == "big":  # 64x64 noise: ~12 KiB as PNG
        url = _data_url(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    client = OpenAI(base_url=f"{server}/vlm/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="shapes-vlm", messages=_image_message(url), max_tokens=4)
    assert expected in str(e.value), str(e.value)


def test_a_typed_placeholder_and_too_many_images_are_400s(server):
    from openai import BadRequestError, OpenAI
    from PIL import Image

    client = OpenAI(base_url=f"{server}/vlm/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(BadRequestError) as e:  # text only, but "<image>" typed into it
        client.chat.completions.create(model="shapes-vlm", messages=[{"role": "user", "content": "<image> hi"}],
                                       max_tokens=4)
    assert "1 <image> placeholder(s) for 0 image(s)" in str(e.value), str(e.value)
    url = _data_url(Image.new("RGB", (8, 8)))
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="shapes-vlm", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}] * 9}])
    assert "9 images in one request, above this server's limit of 8" in str(e.value), str(e.value)
    # a text request to the vision-language model is answered
    r = client.chat.completions.create(model="shapes-vlm", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_an_image_to_a_text_model_is_a_400_naming_it(client):
    from openai import BadRequestError
    from PIL import Image

    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=_image_message(_data_url(Image.new("RGB", (8, 8)))),
                                       max_tokens=4)
    assert "model tiny takes text only" in str(e.value), str(e.value)
