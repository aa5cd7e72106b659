"""Flask front end of jobgate."""

from gateway_web.app import create_app
from gateway_web.live import create_live_app

__all__ = ["create_app", "create_live_app"]
