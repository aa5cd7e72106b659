"""Flask front end of jobgate."""

from gateway_web.app import create_app

__all__ = ["create_app"]
