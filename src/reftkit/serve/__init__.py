"""`reftkit serve`: an OpenAI-compatible HTTP server for one base model with many ReFT adapters and steering
vectors chosen per request and batched together.

Layout (one concept per file; imports run downwards):
- `config.py`    ServerConfig: every limit and knob, checked once.
- `protocol.py`  request validation (OpenAI's chat/completions bodies + the `reftkit` extension) and the OpenAI
                 objects the server answers with, errors included (`ApiError`).
- `registry.py`  adapters and steering vectors the server may use: loaded at start, and (behind a flag) loaded
                 and unloaded at runtime from one allow-listed folder, persisted so a restart finds them again.
- `sampling.py`  per-row temperature / top-p / seed inside one batched `generate`.
- `streaming.py` the batched streamer: per-row incremental detokenisation, stop strings, finish reasons.
- `generation.py` one batch of routed rows through the engine (`ReftModel.generate` with per-row adapters, and
                 steering vectors as extra per-row bindings of the same engine call).
- `batcher.py`   the admission queue, the dynamic batcher and the engine thread.
- `metrics.py`   counters, gauges and histograms in Prometheus' text format.
- `security.py`  API keys (constant-time) and the request-body limit.
- `app.py`       the FastAPI application: routes, error handlers, streaming responses, lifespan.

Nothing here is imported by `import reftkit`: FastAPI and uvicorn (the `serve` extra) load only when a server
is built.
"""
