"""falhook: receive fal.ai webhooks durably.

Two packages: `falhook.verify` (check a delivery's signature) and `falhook.receiver`
(the durable receiver service and mountable app).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
