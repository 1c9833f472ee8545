"""`python -m rice_mllm.serve`: an OpenAI-compatible HTTP server (chat completions, streaming, batching) and a web
chat page, over any kit checkpoint. Needs the `serve` extra (Starlette, uvicorn): `pip install -e ".[serve]"`.

Modules: `protocol` (OpenAI request parsing, errors, response bodies), `images` (where images may come from),
`batching` (one model thread answering concurrent requests in left-padded batches), `app` (routes), `page` (the
chat page), `cli` (the command line).
"""
