"""What the device and the server agree on over HTTP (no torch, no FastAPI: the edge imports it).

- ``POST INFER_PATH`` with one codec message (:mod:`splitexit.split.codec`) as the body,
  ``Content-Type: application/octet-stream``, an optional ``X-Request-ID`` (echoed back) and
  ``Authorization: Bearer <token>``.
- 200 answers ``{"request_id", "predictions", "logits", "batch_size", "queue_ms",
  "compute_ms"}``; errors ``{"error": reason, "request_id"}``.
"""

from __future__ import annotations

__all__ = ["INFER_PATH", "LEGACY_INFER_PATH", "HEALTH_PATH", "METRICS_PATH",
           "REQUEST_ID_HEADER", "CONTENT_TYPE"]

#: the inference endpoint
INFER_PATH = "/v1/infer"
#: the same endpoint under its first name (kept for old clients)
LEGACY_INFER_PATH = "/infer"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
REQUEST_ID_HEADER = "X-Request-ID"
CONTENT_TYPE = "application/octet-stream"
