FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY . /app
# Editable, so Alembic's migrations/ and alembic.ini stay beside the packages that find them.
RUN pip install --no-cache-dir -e . && useradd --system jobgate && chown -R jobgate /app
USER jobgate
EXPOSE 8080
CMD ["gunicorn", "--no-control-socket", "--workers", "2", "--worker-class", "gevent", "--worker-connections", "2000", "--bind", "0.0.0.0:8080", "gateway_web:create_live_app()"]
