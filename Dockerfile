# breakglass: `docker build -t breakglass .`, then see docs/setup.md ("Run it
# with Docker"). The policy is mounted at /config/breakglass.toml and the
# SQLite database lives on the /data volume; secrets come from the
# environment (SLACK_BOT_TOKEN, SLACK_SIGNING_SECRET, BREAKGLASS_MASTER_KEY).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bot ./bot
# The postgres extra adds asyncpg, so BREAKGLASS_DATABASE_URL may also be
# postgresql+asyncpg://...
RUN pip install --no-cache-dir ".[postgres]" \
    && rm -rf /src

# An unprivileged user that owns nothing but the data directory.
RUN groupadd --system --gid 10001 breakglass \
    && useradd --system --uid 10001 --gid breakglass --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin breakglass \
    && mkdir -p /data /config \
    && chown breakglass:breakglass /data \
    && chmod 0700 /data

ENV BREAKGLASS_DATABASE_URL=sqlite+aiosqlite:////data/breakglass.db \
    BREAKGLASS_POLICY=/config/breakglass.toml \
    BREAKGLASS_HOST=0.0.0.0 \
    BREAKGLASS_PORT=3000 \
    BREAKGLASS_METRICS_ADDR=0.0.0.0:9464

VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
# 3000: Slack, health, JWKS, introspection. 9464: GET /metrics only; publish it to
# your monitoring network, not to the internet.
EXPOSE 3000 9464

# 200 only while the database answers (GET /healthz); works in Socket Mode too.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BREAKGLASS_PORT', '3000'), timeout=3)" || exit 1

# Exec form: breakglass is PID 1 and gets SIGTERM itself; it drains for up to
# 10 s, so give `docker stop` more than that (docker stop -t 15).
CMD ["breakglass", "serve"]
