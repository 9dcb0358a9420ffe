"""A load-testing client of `adadecode serve`, measuring what `vllm bench serve` measures, under its names.

``run`` starts ``args.clients`` concurrent clients that each send ``args.requests`` streamed
greedy requests back to back (a text prompt to /v1/completions, a chat prompt to
/v1/chat/completions, with ``stream_options.include_usage``, each asking for exactly
``args.max_tokens``); ``report`` prints and returns request throughput, output and total
token throughput, and TTFT / TPOT / ITL / E2EL mean, median and p99 (TTFT: to the first
text chunk; TPOT: per request, (E2EL - TTFT) / (output tokens - 1); ITL: every gap between
text chunks, pooled; E2EL: whole request), plus errors and what the server's /metrics
counted during the run (early tokens, rollbacks, stage busy fraction). ``alone`` decodes
prompts one at a time with early exit off, the reference of a parity check.

Bounded: ``check_loopback`` refuses any server off this machine's loopback; ``run`` ends at
``args.max_seconds`` (requests still open are cancelled and counted as errors) and every
request has ``args.timeout``. Used by scripts/load_test.py and scripts/serve_sweep.py; needs
``httpx`` (the ``test`` extra).
"""


from __future__ import annotations

import asyncio
import ipaddress
import json
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

MAX_CLIENTS, MAX_REQUESTS = 256, 4096  # the most one run may open


@dataclass
class Result:
    client: int
    prompt_index: int
    ok: bool = False
    error: str = ""
    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)


def check_loopback(url: str) -> None:
    """Refuse any server that is not on this machine's loopback (no name is looked up but localhost)."""
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: not looked up
        loopback = False
    if not loopback:
        raise SystemExit(f"load_test: refusing {url}: only a server on loopback (127.0.0.0/8, ::1, localhost) is "
                         "load-tested")


def request_body(
    prompt, model: str, max_tokens: int, early_exit: str | None, stream: bool, ignore_eos: bool = False
) -> tuple[str, dict]:
    chat = isinstance(prompt, list)
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if ignore_eos:  # every request runs to max_tokens: a steady load (vllm bench serve --ignore-eos)
        body["ignore_eos"] = True
    body["messages" if chat else "prompt"] = prompt
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    if early_exit:
        body["early_exit"] = early_exit
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


async def one_request(http: httpx.AsyncClient, result: Result, prompt, args, model: str) -> Result:
    path, body = request_body(prompt, model, args.max_tokens, args.early_exit, stream=True,
                              ignore_eos=args.ignore_eos)
    result.start = t0 = time.perf_counter()
    last, parts = None, []
    try:
        async with http.stream("POST", path, json=body, timeout=args.timeout) as r:
            if r.status_code != 200:
                await r.aread()
                result.error = f"HTTP {r.status_code}: {r.text[:300]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", str(chunk["error"]))
                    return result
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            result.ttft = now - t0
                        else:
                            result.itl.append(now - last)
                        last = now
                        parts.append(text)
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
        result.e2el = time.perf_counter() - t0
        result.text = "".join(parts)
        result.ok = bool(result.finish_reason)
        if not result.ok:
            result.error = "the stream ended without a finish reason"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
    except asyncio.CancelledError:
        result.error = "cancelled at --max-seconds"
        raise
    return result


async def client_loop(c: int, http, prompts, args, model, results: list[Result]) -> None:
    for i in range(args.requests):
        index = (c * args.requests + i) % len(prompts)
        result = Result(c, index)
        results.append(result)
        await one_request(http, result, prompts[index], args, model)


def metrics(http_url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{http_url}/metrics", timeout=30).text):
        for s in family.samples:
            key = s.name + "".join(f"[{k}={v}]" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def stats(values: list[float]) -> tuple[float, float, float]:
    if not values:
        return 0.0, 0.0, 0.0
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered) + 0.5) - 1))]
    return statistics.fmean(values), statistics.median(values), p99


async def run(args, prompts, model: str) -> tuple[list[Result], float]:
    results: list[Result] = []
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=args.url, limits=limits) as http:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client_loop(c, http, prompts, args, model, results)) for c in range(args.clients)]
        _, pending = await asyncio.wait(tasks, timeout=args.max_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
    for r in results:
        if not r.ok and not r.error:
            r.error = "cancelled at --max-seconds"
    return results, duration


def alone(args, prompts, indices, model: str) -> dict[int, tuple[str, int, str]]:
    """Each prompt decoded alone with early exit off (plain greedy): one non-streamed request at a time."""
    out = {}
    with httpx.Client(base_url=args.url, timeout=args.timeout) as http:
        for i in sorted(indices):
            path, body = request_body(prompts[i], model, args.max_tokens, "off", stream=False,
                                      ignore_eos=args.ignore_eos)
            r = http.post(path, json=body)
            r.raise_for_status()
            answer = r.json()
            choice = answer["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            out[i] = (text, answer["usage"]["completion_tokens"], choice["finish_reason"])
    return out


def report(results: list[Result], duration: float, before: dict, after: dict, args) -> dict:
    good = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in good)
    output_tokens = sum(r.output_tokens for r in good)
    ttft = [r.ttft for r in good]
    tpot = [(r.e2el - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    itl = [x for r in good for x in r.itl]
    e2el = [r.e2el for r in good]
    summary = {
        "completed": len(good), "failed": len(results) - len(good), "duration": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(good) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "max_concurrency": args.clients,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        mean, median, p99 = stats(values)
        summary.update({f"mean_{name}_ms": mean * 1e3, f"median_{name}_ms": median * 1e3, f"p99_{name}_ms": p99 * 1e3})

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    def total(prefix: str) -> float:
        return sum(delta(k) for k in after if k.startswith(prefix))

    summary["server"] = {
        "early_tokens_emitted": total("adadecode:early_tokens_emitted_total"),
        "early_tokens_accepted": total("adadecode:early_tokens_accepted_total"),
        "early_tokens_rolled_back": total("adadecode:early_tokens_rolled_back_total"),
        "stage_busy_fraction": [delta(k) / duration for k in sorted(after)
                                if k.startswith("adadecode:stage_busy_seconds_total")],
        "generation_tokens": delta("adadecode:generation_tokens_total"),
    }
    w = 50
    lines = [
        "{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="="),
        f"{'Successful requests:':<40}{len(good):<10}",
        f"{'Failed requests:':<40}{len(results) - len(good):<10}",
        f"{'Maximum request concurrency:':<40}{args.clients:<10}",
        f"{'Benchmark duration (s):':<40}{duration:<10.2f}",
        f"{'Total input tokens:':<40}{input_tokens:<10}",
        f"{'Total generated tokens:':<40}{output_tokens:<10}",
        f"{'Request throughput (req/s):':<40}{summary['request_throughput']:<10.2f}",
        f"{'Output token throughput (tok/s):':<40}{summary['output_throughput']:<10.2f}",
        f"{'Total Token throughput (tok/s):':<40}{summary['total_token_throughput']:<10.2f}",
    ]
    for name, title, label in (("ttft", "Time to First Token", "TTFT"),
                               ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                               ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^{n}}".format(s=title, n=w, c="-"))
        for stat, word in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            lines.append(f"{word + ' ' + label + ' (ms):':<40}{summary[stat + '_' + name + '_ms']:<10.2f}")
    server = summary["server"]
    lines.append("{s:{c}^{n}}".format(s="Server (/metrics during the run)", n=w, c="-"))
    lines.append(f"{'Early tokens emitted / accepted / rolled back:':<48}{server['early_tokens_emitted']:.0f} / "
                 f"{server['early_tokens_accepted']:.0f} / {server['early_tokens_rolled_back']:.0f}")
    busy = ", ".join(f"{f:.2f}" for f in server["stage_busy_fraction"])
    lines.append(f"{'Stage busy fraction:':<48}{busy}")
    lines.append("=" * w)
    print("\n".join(lines))
    errors = [r for r in results if not r.ok]
    for r in errors[:5]:
        print(f"error (client {r.client}, prompt {r.prompt_index}): {r.error}")
    return summary
