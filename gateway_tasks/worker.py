"""Worker entry: ``celery -A gateway_tasks.worker worker -Q svc.<service>`` (and beat, flower)."""

from gateway_core.settings import load_settings
from gateway_tasks import tasks  # noqa: F401  (registers the tasks)
from gateway_tasks.celery_app import create_celery

app = create_celery(load_settings())
