"""lm-evaluation-harness (``lm_eval``, EleutherAI) against ``adadecode serve``: its
``local-completions`` model on the server scores three small tasks as its ``hf`` model
(transformers) scores them on the same model, the bundled SmolLM2-135M in float32.

The tasks are shipped in tests/lm_eval_tasks/ (a YAML and a few JSONL examples each; nothing is
downloaded) and run through the harness' own pipeline (``TaskManager.load`` -> ``evaluate``):

- ``adadecode_lambada_mini``: ``loglikelihood`` requests, lambada_openai's metrics;
- ``adadecode_arc_mini``: ``multiple_choice`` (a ``loglikelihood`` request per choice), arc_easy's;
- ``adadecode_qa_mini``: ``generate_until`` (greedy, until a newline or 16 tokens), exact match.

Then an answer that ends at EOS, generated and scored (the EOS token must be in the echoed
response), and ``local-chat-completions`` against ``hf`` with the chat template.

The server runs the model on 2 in-process stages with the shipped exit heads at a low threshold
and early exit ``eager`` by default (lm-eval sends no ``early_exit``): the heads' tokens are
verified, some accepted and most rolled back, and none of it shows. For ``loglikelihood``,
lm-eval 0.4.13 sends ``echo``, ``logprobs: 1``, ``max_tokens: 1`` and, with ``batch_size=4``, a
list of prompts of token ids; it reads the log probabilities of ``tokens[ctxlen:-1]`` (the last
one is the decoded token) and ``is_greedy`` from the top-1 alternatives.

Compared request by request: the log-likelihoods within ``ATOL`` (1e-4 absolute: sums of a few
float32 ``log_softmax`` values from two implementations of the same forward, transformers' one
call over the whole sequence against the runtime's prefill, whose matmuls round differently), the
``is_greedy`` flags and the generated texts exactly; then the tasks' metrics. Measured: 1.3e-5 at
most (lambada's perplexity 3.431637 on both, to 2e-7 relative), every flag and text equal.

About 25 s on 2 cores (the model loads twice: the served engine and transformers').
"""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import bundled_model_dir

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install 'lm_eval[api]'")

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ["adadecode_arc_mini", "adadecode_lambada_mini", "adadecode_qa_mini"]
NAME = "smollm2-135m-instruct"
THRESHOLD = 0.3  # below the heads' calibrated ones: more early tokens, most of them rolled back
ATOL = 1e-4  # log-likelihoods: float32 sums over a few tokens from two forwards of the same weights


@pytest.fixture(scope="module")
def offline():
    """No hub: the tokenizer and the model are read from the bundled model's directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield


@pytest.fixture(scope="module")
def server(offline):
    """``adadecode serve``'s app on loopback: the bundled model on 2 in-process stages with its
    shipped heads, early exit ``eager`` by default."""
    from adadecode.launcher.serve.app import Frontend, ServeDefaults, build_app
    from adadecode.launcher.serve.http_server import HttpServer
    from adadecode.runtime.engine import Engine
    from adadecode.runtime.serving import ServingLoop

    bundled_model_dir()  # skip without the bundled model
    engine = Engine.load("bundled:smollm2-135m-instruct", stages=2, heads="auto", thresholds=(THRESHOLD,),
                         max_seq_len=256, num_slots=4, device="cpu", dtype="float32")
    assert engine.heads_loaded and not engine.early_exit_off_here
    frontend = Frontend(ServeDefaults(NAME, max_tokens=16, early_exit="eager", max_seq_len=256))
    http = HttpServer(build_app(frontend), "127.0.0.1", 0).start()
    loop = ServingLoop(engine, max_num_seqs=4, max_queue=16).start()
    frontend.attach(engine, loop)
    try:
        yield http.url, loop
    finally:
        frontend.shutdown()
        http.stop()


@pytest.fixture(scope="module")
def lms(server):
    """lm-eval's ``local-completions`` on the server and its ``hf`` on transformers, one model."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    path = str(bundled_model_dir())
    served = LocalCompletionsAPI(base_url=f"{server[0]}/v1/completions", model=NAME, tokenizer=path,
                                 tokenizer_backend="huggingface", batch_size=4, max_retries=1, max_length=256)
    return served, HFLM(pretrained=path, device="cpu", dtype="float32", batch_size=1, max_length=256)


def task_configs(cache_dir: Path) -> list[dict]:
    """The shipped task YAMLs as configs, their data files absolute and the datasets cache in
    ``cache_dir`` (the YAMLs name their data relative to the repository, for the CLI)."""
    configs = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        files = config["dataset_kwargs"]["data_files"]
        files["test"] = str(TASKS_DIR / Path(files["test"]).name)
        config["dataset_kwargs"]["cache_dir"] = str(cache_dir)
        configs.append(config)
    assert [c["task"] for c in configs] == TASKS
    return configs


def evaluate(lm, configs: list[dict], **kw) -> dict:
    """The harness' evaluation of ``lm`` on ``configs``: its ``results`` and ``samples``."""
    from lm_eval.evaluator import evaluate as lm_evaluate
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_defaults=False).load(configs)
    return lm_evaluate(lm, tasks, bootstrap_iters=0, log_samples=True, **kw)


def metrics(results: dict, task: str) -> dict[str, float]:
    """``task``'s scores, e.g. ``{"acc,none": 0.75, ...}`` (no stderr: bootstrap_iters=0)."""
    return {k: v for k, v in results["results"][task].items() if "," in k and "_stderr," not in k}


def same_response(x, y) -> float:
    """Assert that one request's responses agree; return the log-likelihoods' difference (0 for text)."""
    if isinstance(x, str):  # generate_until: the text, exactly
        assert x == y
        return 0.0
    (ll_x, greedy_x), (ll_y, greedy_y) = x, y  # loglikelihood
    assert greedy_x == greedy_y and math.isclose(ll_x, ll_y, rel_tol=0, abs_tol=ATOL), (x, y)
    return abs(ll_x - ll_y)


def test_tasks_score_the_same_on_the_server_as_on_transformers(lms, server, tmp_path):
    """Every request's response, and every task's metrics, of ``local-completions`` on the
    server equal ``hf``'s; and early exit ran (the heads emitted tokens, verified)."""
    served, hf = lms
    configs = task_configs(tmp_path / "datasets")
    ours, theirs = evaluate(served, configs), evaluate(hf, configs)

    worst, greedy = 0.0, []
    for task in TASKS:
        a_samples, b_samples = ours["samples"][task], theirs["samples"][task]
        assert [s["doc_id"] for s in a_samples] == [s["doc_id"] for s in b_samples] and a_samples
        for a, b in zip(a_samples, b_samples):
            assert a["arguments"] == b["arguments"]  # the same requests
            assert len(a["resps"]) == len(b["resps"])
            for (x,), (y,) in zip(a["resps"], b["resps"]):
                worst = max(worst, same_response(x, y))
                greedy += [] if isinstance(x, str) else [x[1]]
        assert metrics(ours, task).keys() == metrics(theirs, task).keys()
        for key, value in metrics(theirs, task).items():
            assert math.isclose(metrics(ours, task)[key], value, rel_tol=1e-5, abs_tol=ATOL), (task, key)
    assert True in greedy and False in greedy  # both flags occur: is_greedy is really compared
    texts = [s["resps"][0][0] for s in ours["samples"]["adadecode_qa_mini"]]
    assert texts[2] == "" and len(set(texts)) == len(texts)  # one ended at EOS at once; the others differ
    counts = server[1].metrics()
    early = {k: sum(counts[f"early_{k}"].values()) for k in ("emitted", "accepted", "rejected")}
    assert early["accepted"] > 0 and early["rejected"] > 0, early
    print(f"\nmax |loglikelihood difference| {worst:.2e}; {greedy.count(True)} of {len(greedy)} greedy;"
          f" early tokens {early}")
    for task in TASKS:
        print(task, metrics(ours, task), metrics(theirs, task))
    print("generations", texts)


def test_an_answer_that_ends_at_eos_is_generated_and_scored_the_same(lms, server):
    """A chat prompt whose greedy answer ends at EOS: lm-eval's ``generate_until`` gives the same
    text on both; and its ``loglikelihood`` of that answer, which drops the last token of the
    echoed response (the one ``max_tokens: 1`` decodes), needs that token there even when it is
    EOS (empty text, ``finish_reason: stop``), or it would drop the answer's last token."""
    from lm_eval.api.instance import Instance

    served, hf = lms
    context = served.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2? Answer with a number only."}],
        tokenize=False, add_generation_prompt=True)
    ask = [Instance("generate_until", {}, (context, {"until": ["\n\n"], "max_gen_toks": 16, "do_sample": False}), 0)]
    (answer,), (answer_hf,) = served.generate_until(ask), hf.generate_until(ask)
    assert answer == answer_hf == "2 + 2 = 4"

    ids = served.tok_encode(context + answer)
    r = httpx.post(f"{server[0]}/v1/completions", timeout=60, json={
        "model": NAME, "prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True})
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "stop" and choice["logprobs"]["tokens"][len(ids):] == [""]  # EOS

    score = [Instance("loglikelihood", {}, (context, answer), 0)]
    ((ll, is_greedy),), ((ll_hf, is_greedy_hf),) = served.loglikelihood(score), hf.loglikelihood(score)
    assert is_greedy and is_greedy_hf  # the greedy answer, all of it
    assert math.isclose(ll, ll_hf, rel_tol=0, abs_tol=ATOL), (ll, ll_hf)


def test_local_chat_completions_generates_as_hf_with_the_chat_template(lms, server, tmp_path):
    """``local-chat-completions`` (``/v1/chat/completions``, the server applies the chat template)
    against ``hf`` with ``apply_chat_template`` (transformers' tokenizer applies it): the same
    generations (the first two examples, whose answers end at EOS). Chat has no log-likelihoods in
    lm-eval."""
    from lm_eval.models.openai_completions import LocalChatCompletion

    _, hf = lms
    chat = LocalChatCompletion(base_url=f"{server[0]}/v1/chat/completions", model=NAME, max_retries=1)
    configs = [c for c in task_configs(tmp_path / "datasets") if c["output_type"] == "generate_until"]
    ours, theirs = (evaluate(lm, configs, apply_chat_template=True, limit=2) for lm in (chat, hf))  # short answers
    texts = [s["resps"][0][0] for s in ours["samples"]["adadecode_qa_mini"]]
    assert texts == [s["resps"][0][0] for s in theirs["samples"]["adadecode_qa_mini"]]
    assert texts[1] == "3 + 4 = 7"  # the template was applied: a chat answer, not a completion
    print("\nchat generations", texts)
