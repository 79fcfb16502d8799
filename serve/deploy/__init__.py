"""Deploying elsewhere: Kubernetes manifests (``make deploy-manifests``) and the NGC GPU
compose file (``docker-compose.gpu.yml``)."""

from serve.core.exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__, {"k8s": ["DeployConfig", "write_manifests", "DEFAULT_IMAGE"]}
)
