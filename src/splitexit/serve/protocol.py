"""What the device and the server agree on over HTTP (no torch, no FastAPI: the edge imports it).

- ``POST INFER_PATH`` with one codec message (:mod:`splitexit.split.codec`) as the body,
  ``Content-Type: application/octet-stream``, an optional ``X-Request-ID`` (echoed back) and
  ``Authorization: Bearer <token>``.
- 200 answers ``{"request_id", "predictions", "logits", "batch_size", "queue_ms",
  "compute_ms"}``; errors ``{"error": reason, "request_id"}`` (a 413 adds ``"limits"``, a 422
  for non-finite logits adds ``"rows"``: the request's samples that overflowed).
- ``GET HEALTH_PATH``: ``{"status"}`` for anyone; with the token also the model, cut, codec,
  payload spec and ``"limits"`` (``max_request_samples``, ``max_request_bytes``), which the
  edge reads to size its requests.

There is one inference path, ``/v1/infer``; the unversioned ``/infer`` alias of early versions
is gone (404).
"""

from __future__ import annotations

__all__ = ["INFER_PATH", "HEALTH_PATH", "METRICS_PATH",
           "REQUEST_ID_HEADER", "CONTENT_TYPE"]

#: the inference endpoint
INFER_PATH = "/v1/infer"
HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"
REQUEST_ID_HEADER = "X-Request-ID"
CONTENT_TYPE = "application/octet-stream"
