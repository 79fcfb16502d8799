"""The public front: HAProxy in front of a private tritonserver (torch-free).

Triton 2.51 (the newest that nvidia-pytriton ships) has frontend bugs no model check can
reach: a deeply nested JSON body or a gzip bomb kills it, chunked bodies of tiny chunks
crash it (CVE-2025-23310), it has no idle timeout or connection cap, and its queue bound
(a dynamic-batching queue policy) makes its batcher sleep 500 ms with a request waiting
(its core turns off payload prefetching when any queue policy is set, and then wakes
the batcher only if an instance is idle at that very moment). So ``serve run`` puts the
public HTTP, gRPC and metrics ports in the hands of HAProxy (Debian's ``haproxy`` 2.6,
chosen over nginx because it counts the requests a backend holds - ``be_conn`` - so the
queue bound is one rule, and inspects request bodies without a scripting module) and
keeps Triton where only the front and its owner reach it.

What the generated configuration (:func:`render`) enforces, before Triton sees a byte:

- **Routes** (allow-list): health, server metadata, and metadata / config / readiness /
  inference of the public models (``<model>`` and ``<model>_image``) only; every other
  route - the control plane, statistics, trace, logging, shared memory, the internal
  ``<model>_preprocess`` and gRPC streaming - needs the admin key or is refused (HTTP 403,
  gRPC PERMISSION_DENIED). With ``inference_key`` set, inference needs that key too.
- **Bodies**: a size cap (default from max batch x input size), ``Content-Encoding``
  refused (415), chunked HTTP bodies refused (411: no tiny-chunk attack reaches Triton),
  JSON tensor bodies and the JSON header of binary requests capped at ``max_json_bytes``
  and refused when nested deeper than ``max_json_depth``; header size and count and URL
  length bounded (``tune.bufsize``, ``tune.http.maxhdr``); non-admin inference that names
  a shared-memory region refused.
- **Slow bodies**: a request body is held until it has arrived whole (HAProxy's buffer
  is sized to the largest request the queue bound counts), within ``body_timeout_s`` of
  its headers and with no pause over ``header_timeout_s`` (408 / DEADLINE_EXCEEDED); a
  larger one streams on with a deadline at ``min_body_rate`` (serve/runtime/body_rate.lua,
  a Lua filter woken even when no byte comes). So a body still arriving holds only its
  own connection: the queue bound counts only requests that arrived whole.
- **Connections**: counted when accepted, per address and per client network (the
  address masked to ``network_v4`` / ``network_v6``), an eighth of both shares while the
  front is half full; a global cap; a client network's concurrent requests capped (429);
  the first request (and an HTTP/2 preface) within the header timeout; idle and request
  deadlines; gRPC streams per connection capped.
- **The queue**: at most ``max_queue`` requests are inside Triton at once (running or in
  its policy-free queue; counted once their bodies are whole); the rest are refused at
  once (503 / gRPC UNAVAILABLE, "server busy"). It is bounded in bytes too
  (``max_queue_bytes``): those requests may be at most
  :attr:`FrontOptions.small_body_bytes` each (half the byte budget over ``max_queue``: a
  few images), and larger ones (batches, up to ``max_body_bytes``) go through a backend of
  their own holding at most :attr:`FrontOptions.max_large_requests` (the other half).
  Nothing waits in HAProxy: a gRPC stream held there keeps its body in the
  connection's flow-control window and stalls every other stream of that connection
  once (503). Triton's own queue stays policy-free, so it never stalls.
- **Names read in full**: every gRPC message the front lets through is parsed whole in
  Lua (serve/runtime/grpc_check.lua): ModelInfer to its tensor bytes, the other open
  methods (a model name and version, at most 4 KiB) field by field.
- **Client errors are 4xx**: a body Triton 2.51 cannot parse, which it answers with 500,
  gets 400 with Triton's message.
- **The owner's listeners**: inside Triton's private namespace (only the owner enters
  it), every call is the owner's without a key - where perf_analyzer runs.
- **TLS** on HTTP and gRPC when a certificate is given.

Secrets (the admin and inference keys, the TLS key) sit in files of mode 0600 in a
folder of mode 0700, never in an argv or an environment another user can read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from serve.backend.errors import UserError

# FrontOptions (serve/runtime/front_options.py) and render (serve/runtime/front_config.py)
# are this module's names too: the front is imported from here.
__all__ = ["HAPROXY_PATHS", "FrontUnavailable", "find_haproxy"]

HAPROXY_PATHS = ("/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy")


class FrontUnavailable(UserError, RuntimeError):
    """No haproxy binary on this machine."""


def find_haproxy() -> str:
    """Path of the haproxy binary (Debian package ``haproxy``)."""
    found = shutil.which("haproxy") or next((p for p in HAPROXY_PATHS if Path(p).is_file()), None)
    if not found:
        raise FrontUnavailable(
            "haproxy is not installed: the public ports need the front (`make setup` installs "
            "it as root: apt-get install haproxy); `serve run --no-front` serves Triton "
            "directly on loopback only"
        )
    return found
