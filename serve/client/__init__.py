"""Clients of a running server (tritonclient; torch-free): the classifier (sync and
async, HTTP and gRPC, shared memory), model metadata, accuracy through the server, and
the control plane (admin: list, load, unload, restart, roll back, health)."""

from serve.core.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "client": ["Classifier"],
        "async_classifier": ["AsyncClassifier"],
        "model_info": ["Prediction"],
        "serve.core.errors": [
            "ClientError",
            "InferenceFailed",
            "ModelNotReady",
            "ServerUnavailable",
            "is_transient",
        ],
        "connect": ["DEFAULT_URLS", "make_client"],
        "evaluate": ["evaluate_served"],
        "admin": ["list_models"],
    },
)
