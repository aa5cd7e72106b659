"""Celery side of jobgate: the app, the dispatch task, the balancer, the replica client, the sweeper."""
