# The Django app served by gunicorn. Build: docker compose build (see docker-compose.yml).
# .dockerignore lets in only what the container runs: account/ (without its tests), config/,
# manage.py, requirements.txt and the scripts the container calls.
FROM python:3.11.7-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000

WORKDIR /app

# The app runs as this user. /app (the code) stays root's, read-only to it; it writes only
# to the backups and reports volumes.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home app

# Requirements first, so code changes do not reinstall them.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .

# Static files for the admin, served by whitenoise. The key only satisfies the settings here.
RUN DEBUG=off READ_DOT_ENV=off SECRET_KEY=collectstatic-only-not-a-secret \
        python manage.py collectstatic --no-input -v 0 \
    && mkdir -p /app/backups /app/reports && chown 10001:10001 /app/backups /app/reports

USER 10001:10001

EXPOSE 8000

ENTRYPOINT ["scripts/entrypoint.sh"]
CMD ["gunicorn", "--config", "config/gunicorn.py", "config.wsgi"]
