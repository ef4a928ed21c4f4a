"""Ray Serve deployments. `deployments:app` is the application builder for `serve run`.

Importing this package is cheap: torch, transformers and DeepSpeed load inside replicas.
"""

from deployments.builder import app, build_app

__all__ = ["app", "build_app"]
