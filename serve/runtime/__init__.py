"""The server runtime: tritonserver (options, command, supervision), the public HAProxy
front and its gRPC check, ``serve run``'s stack with Triton in a private namespace, and
the stub watchdog."""

from serve.core.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "triton_server": ["TritonServer"],
        "server_options": ["ServerOptions"],
        "handle": ["free_port"],
        "stack": ["PublicServer"],
        "limits": ["FrontLimits"],
        "front_options": ["FrontOptions"],
        "front_config": ["render"],
        "watchdog": ["Watchdog", "WatchdogConfig"],
    },
)
