"""`calm serve`: an OpenAI-compatible HTTP server with streaming and continuous batching.

- `calm.serve.engine`: the continuous-batching decode engine (one thread, per-row KV-cache
  slots and per-row random streams, so a request's output does not depend on the batch);
- `calm.serve.text`: incremental detokenization and stop sequences;
- `calm.serve.schema`: OpenAI's completions request / response objects and error objects;
- `calm.serve.app`: the FastAPI app (routes, streaming, limits);
- `calm.serve.command`: the ``calm serve`` command (uvicorn, SIGTERM handling).

FastAPI and uvicorn come with the optional extra: ``pip install -e ".[serve]"``.
"""
