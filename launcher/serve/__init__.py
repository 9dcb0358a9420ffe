"""`adadecode serve`, the OpenAI-compatible HTTP front end (docs/serving.md).

- ``command.py``: the command: the start-up memory check, listening, serving until stopped;
- ``app.py``: the FastAPI app: routes, API key, body limit, the bridge to the serving loop;
- ``http_server.py``: uvicorn in a thread, its socket, the per-connection deadlines;
- ``openai_api.py``: the API's request and response schemas and errors;
- ``metrics.py``: Prometheus metrics of the server;
- ``load_test.py``: a load-testing client (scripts/load_test.py, scripts/serve_sweep.py).

Nothing is imported here, so that each module costs only what it uses.
"""
