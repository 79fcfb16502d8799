"""The server runtime: tritonserver (options, command, supervision), the public HAProxy
front and its gRPC check, ``serve run``'s stack with Triton in a private namespace, and
the stub watchdog."""

from serve.core.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "triton_server": ["ServerOptions", "TritonServer", "free_port"],
        "stack": ["PublicServer"],
        "limits": ["FrontLimits"],
        "front": ["FrontOptions", "render"],
        "watchdog": ["Watchdog", "WatchdogConfig"],
    },
)
