"""The OpenAI-compatible speech server: `create_app(Settings(...))` (app; Settings and their
SOPRANO_* environment variables: settings), the request schema (schemas), the OpenAPI document (openapi), what every request goes through (middleware), Prometheus
metrics (metrics) and `soprano-onnx serve` (command). Audio encoding is pipeline_lib.audio.encode
(shared with `soprano-onnx speak -o`). Needs the `serve` extra: pip install 'soprano-onnx[serve]'."""
