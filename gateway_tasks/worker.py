"""Worker entry: ``celery -A gateway_tasks.worker worker -Q svc.<service>`` (and beat, flower); ``jobgate worker``
starts dispatch workers with the gevent pool sized from the configuration."""

from gateway_tasks.pool import cooperate_with_gevent

cooperate_with_gevent()

from gateway_core.settings import load_settings  # noqa: E402
from gateway_tasks import tasks  # noqa: E402, F401  (registers the tasks)
from gateway_tasks.celery_app import create_celery  # noqa: E402
from gateway_tasks.pool import without_task_events_on_amqp  # noqa: E402

app = create_celery(load_settings())
without_task_events_on_amqp(app)
