"""The OpenAI API surface of `adadecode serve` that benchmark clients (guidellm, vLLM's bench)
rely on, driven with the official ``openai`` client against an in-process server (a
2-stage Engine with exit heads behind uvicorn on loopback; tests/test_server.py has the
hostile fuzz and the multi-rank server):

- ``n`` > 1: greedy choices are identical; sampled choice j equals the same request alone
  with the seed ``seed + j``; usage counts every choice; streams interleave the choices;
- a list of prompts, choices indexed prompt-major (``i * n + j``);
- vLLM's ``ignore_eos`` and ``min_tokens`` (token counts), ``stream_options.include_usage``
  and ``continuous_usage_stats``;
- log probabilities (``logprobs``, chat ``logprobs``/``top_logprobs``) in OpenAI's shapes,
  streamed and not, the same with early exit on and off; ``echo`` with the prompt's log
  probabilities and ``max_tokens: 0``; the penalties;
- the field rule: output-changing fields we lack are refused naming the field, harmless ones
  are accepted and named in ``X-Adadecode-Ignored-Fields``, unknown ones are refused.

A few tokens per request: the module takes about half a minute on 2 cores.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch
from helpers import save_identity_heads, save_tiny_chat_model

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
CHAT = [{"role": "user", "content": "Name three colors."}]
SLOTS, QUEUE = 4, 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The served engine behind a real uvicorn, with exit heads at layer 3 that emit for every
    token (most early tokens are rolled back), and the openai client for it."""
    from adadecode.launcher.serve.app import Frontend, ServeDefaults, build_app
    from adadecode.launcher.serve.http_server import HttpServer
    from adadecode.runtime.engine import Engine
    from adadecode.runtime.serving import ServingLoop
    from openai import OpenAI

    path = save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), seed=3)
    heads = save_identity_heads(path, tmp_path_factory.mktemp("heads"), {3: 0.0})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine.load(str(path), stages=2, split_points=[3], heads=str(heads), max_seq_len=64,
                         num_slots=SLOTS, device="cpu", dtype="float32")
    greedy = engine.generate(PROMPTS[0], max_new_tokens=10).tokens  # before serving: the loop owns the runner
    frontend = Frontend(ServeDefaults("tiny", max_tokens=8, max_seq_len=64))
    http = HttpServer(build_app(frontend), "127.0.0.1", 0).start()
    loop = ServingLoop(engine, max_num_seqs=SLOTS, max_queue=QUEUE).start()
    frontend.attach(engine, loop)
    client = OpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        yield http.url, engine, loop, client, greedy
    finally:
        frontend.shutdown()
        http.stop()
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_slot_left(server):
    """After each test: nothing running or waiting, every slot free on every stage."""
    yield
    _, engine, loop, _, _ = server
    m = {}
    for _ in range(200):
        m = loop.metrics()
        if m["num_requests_running"] == m["num_requests_waiting"] == 0 and m["free_slots"] == SLOTS:
            break
        time.sleep(0.05)
    assert m["num_requests_running"] == m["num_requests_waiting"] == 0 and m["free_slots"] == SLOTS, m
    assert loop.healthy, loop.error


def completion(client, **kw):
    return client.completions.create(model="tiny", **kw)


def test_n_greedy_choices_are_identical_and_usage_counts_every_choice(server):
    _, engine, _, client, _ = server
    alone = completion(client, prompt=PROMPTS[0], max_tokens=6)
    r = completion(client, prompt=PROMPTS[0], max_tokens=6, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [alone.choices[0].text] * 3
    assert [c.finish_reason for c in r.choices] == ["length"] * 3
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (alone.usage.prompt_tokens, 18)  # prompt once
    assert r.usage.total_tokens == alone.usage.prompt_tokens + 18
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, n=2)
    chat_alone = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5)
    assert [c.message.content for c in chat.choices] == [chat_alone.choices[0].message.content] * 2
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 10


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_n_sampled_each_choice_is_the_request_alone_with_seed_plus_index(server, endpoint):
    """Choice j of a request with ``seed`` s is the same request with n = 1 and seed s + j, early
    exit on (eager, early tokens rolled back) for the n choices and off alone."""
    _, _, _, client, _ = server
    kw = dict(max_tokens=8, temperature=1.0, top_p=0.95)

    def ask(n, seed, early_exit):
        extra = {"early_exit": early_exit}
        if endpoint == "chat":
            r = client.chat.completions.create(model="tiny", messages=CHAT, n=n, seed=seed, extra_body=extra, **kw)
            return [c.message.content for c in r.choices], r.usage
        r = completion(client, prompt=PROMPTS[1], n=n, seed=seed, extra_body=extra, **kw)
        return [c.text for c in r.choices], r.usage

    texts, usage = ask(3, 11, "eager")
    alone = [ask(1, 11 + j, "off") for j in range(3)]
    assert texts == [a[0][0] for a in alone]
    assert len(set(texts)) >= 2  # sampled: the seeds give different choices
    assert usage.completion_tokens == sum(a[1].completion_tokens for a in alone)
    assert usage.prompt_tokens == alone[0][1].prompt_tokens


def test_a_stream_of_n_choices_interleaves_them_by_index(server):
    url, _, _, client, _ = server
    kw = dict(prompt=PROMPTS[2], max_tokens=8, n=2, temperature=1.0, seed=3)
    whole = completion(client, **kw)
    chunks = list(completion(client, stream=True, stream_options={"include_usage": True}, **kw))
    indices = [c.choices[0].index for c in chunks if c.choices and c.choices[0].text]
    assert set(indices) == {0, 1} and indices != sorted(indices)  # choice 0 goes on after choice 1 began
    for choice in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [c.finish_reason for c in mine if c.finish_reason] == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 16
    # chat: an opening chunk with the role for each choice, then their deltas
    chat = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, n=2, stream=True))
    assert [(c.choices[0].index, c.choices[0].delta.role) for c in chat[:2]] == [(0, "assistant"), (1, "assistant")]
    assert sorted(c.choices[0].index for c in chat if c.choices[0].finish_reason) == [0, 1]


def test_a_list_of_prompts_gives_choices_prompt_major(server):
    """Strings and token-id lists mixed, n = 2 sampled: choice j of prompt i is at index
    i * n + j and equals prompt i alone with the seed seed + j."""
    _, engine, _, client, _ = server
    prompts = [PROMPTS[0], engine.encode(PROMPTS[1]), PROMPTS[2]]
    kw = dict(max_tokens=5, temperature=0.8, seed=40)
    r = completion(client, prompt=prompts, n=2, **kw)
    assert [c.index for c in r.choices] == list(range(6))
    alone = {(i, j): completion(client, prompt=p, **{**kw, "seed": 40 + j})
             for i, p in enumerate(prompts) for j in range(2)}
    for (i, j), a in alone.items():
        assert r.choices[i * 2 + j].text == a.choices[0].text, (i, j)
    assert r.usage.prompt_tokens == sum(alone[(i, 0)].usage.prompt_tokens for i in range(3))  # each prompt once
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone.values())
    greedy = completion(client, prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=4)
    assert [c.text for c in greedy.choices] == [completion(client, prompt=p, max_tokens=4).choices[0].text
                                                for p in PROMPTS[:2]]


def test_ignore_eos_and_min_tokens_count_tokens(server):
    """Tokens 2 and 6 of the greedy output made EOS (the engine's set, read at admission): the
    first ends the request; with ignore_eos it runs to max_tokens; with min_tokens 3 the first
    is an ordinary token and the second ends it. Early exit eager: counts exact over rollbacks."""
    _, engine, _, client, tokens = server
    ids = engine.encode(PROMPTS[0])
    text = completion(client, prompt=ids, max_tokens=10).choices[0].text
    assert engine._decode(tokens) == text and len(tokens) == 10
    eos = frozenset({tokens[1], tokens[5]})

    def end(min_tokens=0):  # where the rule says the request ends: (finish_reason, tokens)
        n = next((i for i in range(max(1, min_tokens), 11) if tokens[i - 1] in eos), None)
        return ("stop", n) if n else ("length", 10)

    assert end() == ("stop", 2) and end(3) == ("stop", 6) and end(10) == ("length", 10)  # the cases are distinct
    real = engine.eos_token_ids
    engine.eos_token_ids = eos
    try:
        for extra, (reason, n) in [({}, end()), ({"ignore_eos": True}, ("length", 10)),
                                   ({"min_tokens": 3}, end(3)), ({"min_tokens": 10}, end(10)),
                                   ({"min_tokens": 3, "ignore_eos": True}, ("length", 10))]:
            r = completion(client, prompt=ids, max_tokens=10, extra_body={"early_exit": "eager", **extra})
            got = (r.choices[0].finish_reason, r.usage.completion_tokens, r.choices[0].text)
            assert got == (reason, n, engine._decode(tokens[:n])), extra
    finally:
        engine.eos_token_ids = real


def test_continuous_usage_stats_put_usage_in_every_chunk(server):
    _, _, _, client, _ = server
    kw = dict(max_tokens=6, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True})
    chunks = list(completion(client, prompt=PROMPTS[0], **kw))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices and all(c.usage is not None for c in with_choices)
    counts = [c.usage.completion_tokens for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] >= 1
    assert all(c.usage.prompt_tokens == chunks[-1].usage.prompt_tokens for c in with_choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 6
    chat = list(client.chat.completions.create(model="tiny", messages=CHAT, n=2, **kw))
    assert chat[0].usage.completion_tokens == 0  # the opening chunk: nothing generated yet
    last = {c.choices[0].index: c.usage.completion_tokens for c in chat if c.choices}
    assert last == {0: 6, 1: 6} and chat[-1].usage.completion_tokens == 12


def test_output_changing_fields_we_lack_are_refused_naming_them(server):
    import openai

    _, _, _, client, _ = server
    cases = [
        (dict(suffix="x"), "`suffix` = 'x' is not supported"),
        (dict(logit_bias={"5": 1.0}), "`logit_bias` = .* is not supported"),
        (dict(best_of=3), "`best_of` = 3 is not supported"),
        (dict(logprobs=21), "less than or equal to 20"),
        (dict(max_tokens=0), "`max_tokens` must be >= 1, got 0"),
        (dict(presence_penalty=2.5), "presence_penalty = 2.5 is invalid"),
        (dict(extra_body={"repetition_penalty": 0.0}), "repetition_penalty = 0.0 is invalid"),
        (dict(extra_body={"frobnicate": 1}), "unknown field `frobnicate`"),
        (dict(n=QUEUE + 1), rf"asks for {QUEUE + 1} sequences .* queues at most {QUEUE} \(serve.max_queue\)"),
        (dict(prompt=[PROMPTS[0], [1, 10**9]]), r"`prompt\[1\]`: token id 1000000000 is outside the vocabulary"),
        (dict(max_tokens=4, extra_body={"min_tokens": 5}), r"`min_tokens` = 5 is more than max_tokens \(4\)"),
        (dict(n=2, seed=2**63 - 1, temperature=1.0), r"`seed` = 9223372036854775807 with n = 2"),
    ]
    for kwargs, message in cases:
        with pytest.raises(openai.BadRequestError, match=message):
            completion(client, **{"prompt": PROMPTS[0], **kwargs})
    with pytest.raises(openai.BadRequestError, match="`response_format` = .* is not supported"):
        client.chat.completions.create(model="tiny", messages=CHAT, response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="`top_logprobs` needs `logprobs: true`"):
        client.chat.completions.create(model="tiny", messages=CHAT, top_logprobs=2)
    # neutral values change nothing and are accepted
    r = completion(client, prompt=PROMPTS[0], max_tokens=3, n=2, best_of=2, echo=False, logit_bias={},
                   extra_body={"repetition_penalty": 1.0, "skip_special_tokens": True})
    assert len(r.choices) == 2


def test_harmless_fields_are_accepted_and_named_in_a_header(server):
    url, _, _, client, _ = server
    plain = completion(client, prompt=PROMPTS[0], max_tokens=4)
    raw = client.completions.with_raw_response.create(model="tiny", prompt=PROMPTS[0], max_tokens=4, user="u-1",
                                                      extra_body={"metadata": {"run": "7"}, "store": True})
    assert raw.headers["x-adadecode-ignored-fields"] == "user, metadata, store"
    assert raw.parse().choices[0].text == plain.choices[0].text
    chat = client.chat.completions.with_raw_response.create(
        model="tiny", messages=CHAT, max_tokens=3, service_tier="flex", parallel_tool_calls=False)
    assert chat.headers["x-adadecode-ignored-fields"] == "service_tier, parallel_tool_calls"
    with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                      json={"prompt": PROMPTS[0], "max_tokens": 2, "stream": True, "request_id": "r"}) as s:
        assert s.headers["x-adadecode-ignored-fields"] == "request_id"
        assert "data: [DONE]" in list(s.iter_lines())
    assert "x-adadecode-ignored-fields" not in client.completions.with_raw_response.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=2).headers


def test_a_client_that_goes_away_cancels_every_choice(server):
    """A stream of n = 3 dropped after its first chunk: every choice is cancelled and every
    slot freed (checked after the test)."""
    url, _, loop, _, _ = server
    before = loop.metrics()["requests_finished"].get("cancelled", 0)
    body = {"prompt": PROMPTS[1], "max_tokens": 40, "n": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as s:
        first = next(s.iter_lines())
        assert json.loads(first.removeprefix("data: "))["choices"][0]["index"] in (0, 1, 2)
    for _ in range(200):
        if loop.metrics()["requests_finished"].get("cancelled", 0) - before == 3:
            break
        time.sleep(0.05)
    assert loop.metrics()["requests_finished"].get("cancelled", 0) - before == 3


def test_completion_logprobs_in_openais_shape_streamed_or_not_and_with_early_exit(server):
    """``logprobs: 2``: a token, its log probability and its top alternatives (the chosen one
    among them) per output token; the same numbers streamed, and with early exit eager (most early
    tokens rolled back) as off."""
    _, engine, _, client, _ = server
    kw = dict(prompt=PROMPTS[0], max_tokens=6, logprobs=2)
    r = completion(client, **kw, extra_body={"early_exit": "off"})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and top[token] == value and max(top.values()) == value  # greedy: the top one
        assert 2 <= len(top) <= 3
    eager = completion(client, **kw, extra_body={"early_exit": "eager"})
    assert eager.choices[0].logprobs == lp
    chunks = [c for c in completion(client, stream=True, **kw) if c.choices]
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert streamed == lp.token_logprobs and offsets == lp.text_offset
    assert completion(client, prompt=PROMPTS[0], max_tokens=6).choices[0].logprobs is None


def test_chat_logprobs_in_openais_shape_streamed_or_not(server):
    _, _, _, client, _ = server
    kw = dict(model="tiny", messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw, extra_body={"early_exit": "eager"})
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == c.logprob <= 0
        assert c.bytes == list(c.token.encode("utf-8"))
    streamed = [c for chunk in client.chat.completions.create(**kw, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert streamed == content
    no_top = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, logprobs=True)
    assert all(c.top_logprobs == [] for c in no_top.choices[0].logprobs.content)
    assert client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3).choices[0].logprobs is None


def test_echo_gives_the_prompt_and_its_logprobs_from_one_prefill(server):
    """``echo`` with ``logprobs``: the prompt's tokens first (the first without a log probability),
    then the output's; ``max_tokens: 0`` decodes nothing. The prompt's numbers are the ones the
    output's continuation would get: position i's log probability of token i + 1."""
    _, engine, _, client, greedy = server
    ids = engine.encode(PROMPTS[0])
    only = completion(client, prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=1)
    c = only.choices[0]
    assert c.text == PROMPTS[0] and c.finish_reason == "length"
    assert (only.usage.prompt_tokens, only.usage.completion_tokens) == (len(ids), 0)
    assert len(c.logprobs.tokens) == len(ids) and c.logprobs.token_logprobs[0] is None
    assert all(v <= 0 for v in c.logprobs.token_logprobs[1:]) and c.logprobs.top_logprobs[0] is None
    both = completion(client, prompt=PROMPTS[0], max_tokens=4, echo=True, logprobs=1,
                      extra_body={"early_exit": "eager"})
    alone = completion(client, prompt=PROMPTS[0], max_tokens=4, logprobs=1)
    b = both.choices[0]
    assert b.text == PROMPTS[0] + alone.choices[0].text
    assert b.logprobs.token_logprobs == c.logprobs.token_logprobs + alone.choices[0].logprobs.token_logprobs
    assert b.logprobs.text_offset[len(ids)] == len("".join(c.logprobs.tokens))
    # the prompt's next-token log probabilities extend it: its first output token's is the same number
    longer = completion(client, prompt=ids + greedy[:1], max_tokens=0, echo=True, logprobs=1)
    assert longer.choices[0].logprobs.token_logprobs[-1] == alone.choices[0].logprobs.token_logprobs[0]
    assert completion(client, prompt=PROMPTS[0], max_tokens=3, echo=True).choices[0].text.startswith(PROMPTS[0])
    chunks = [ch for ch in completion(client, prompt=PROMPTS[0], max_tokens=4, echo=True, logprobs=1, stream=True)
              if ch.choices]
    assert "".join(ch.choices[0].text for ch in chunks) == b.text
    assert [v for ch in chunks if ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs] == \
        b.logprobs.token_logprobs


def test_penalties_change_the_output_the_same_way_with_early_exit(server):
    _, _, _, client, _ = server
    kw = dict(prompt=PROMPTS[2], max_tokens=8, frequency_penalty=1.5, presence_penalty=1.0,
              extra_body={"repetition_penalty": 1.4})
    off = completion(client, **{**kw, "extra_body": {**kw["extra_body"], "early_exit": "off"}})
    eager = completion(client, **{**kw, "extra_body": {**kw["extra_body"], "early_exit": "eager"}})
    assert off.choices[0].text == eager.choices[0].text
    sampled = [completion(client, **{**kw, "extra_body": {**kw["extra_body"], "early_exit": m}}, temperature=1.0,
                          seed=5) for m in ("off", "eager")]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text
