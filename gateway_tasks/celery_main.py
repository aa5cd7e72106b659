"""``python -m gateway_tasks.celery_main …``: the ``celery`` command, with gevent's monkey-patching done before
anything else is imported when the pool is gevent.

The ``celery`` command patches only after ``import celery`` has imported ``kombu.utils``, whose
``from time import sleep`` then keeps the blocking sleep. Kombu sleeps with it between a worker's attempts to
reach a broker that is away, so in a gevent worker every greenlet — replica calls in flight, answers being
recorded in PostgreSQL — stood still for as long as the broker was away. Patched first, that sleep yields.
"""

from __future__ import annotations

import sys


def _pool(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("-P", "--pool") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--pool="):
            return arg.partition("=")[2]
    return None


if __name__ == "__main__":
    if _pool(sys.argv) == "gevent":
        from gevent import monkey

        monkey.patch_all()

    from celery.__main__ import main

    main()
