"""gunicorn settings for the container (and any host): `gunicorn --config config/gunicorn.py config.wsgi`."""

import os

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Log requests and errors to stdout/stderr, where `docker compose logs` reads them.
accesslog = "-"
errorlog = "-"
timeout = 60
# No control socket (gunicorn >= 25 opens one in $HOME/.gunicorn for `gunicornc`): the
# container is managed by compose, and the app user cannot write to its home, /app.
control_socket_disable = True
