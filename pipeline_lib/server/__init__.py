"""The OpenAI-compatible speech server: `create_app(Settings(...))` (app), the request schema
(schemas), response encoding (encode), Prometheus metrics (metrics) and `soprano-onnx serve`
(command). Needs the `serve` extra: pip install 'soprano-onnx[serve]'."""
