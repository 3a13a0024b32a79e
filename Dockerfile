# The images compose.yaml builds (docs/operations.md, "With compose"). Two targets:
#   app        the daemons (bridge, history API, push) and the mqchat command, on Python
#              3.11, with the web app the history API serves
#   mosquitto  Debian's mosquitto 2 with mqchat's client-id plugin and mosquitto.conf
# tests/test_compose.py runs every service's command from compose.yaml on loopback, and
# checks that every package pyproject.toml installs is copied in here.

# The web app (clients/js): its locked dependencies, then the bundle in dist/site.
FROM node:20-bookworm-slim AS web
WORKDIR /js
COPY clients/js/package.json clients/js/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY clients/js/tsconfig.json clients/js/build-web.mjs ./
COPY clients/js/src src
RUN npm run build

FROM python:3.11-slim-bookworm AS app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
# The locked dependencies first: a code change does not reinstall them.
COPY requirements.lock ./
RUN pip install --no-cache-dir --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY bridge bridge
COPY broker broker
COPY clients clients
COPY core core
COPY history_api history_api
COPY protocol protocol
COPY push push
COPY store store
COPY scripts/container-entrypoint scripts/container-entrypoint
COPY --from=web /js/dist/site web
# The push daemon's VAPID key lives in a volume mounted here: a new volume takes this
# directory's owner, so the daemon (not root) can write the key on its first start.
RUN pip install --no-cache-dir --no-deps . \
    && useradd --system --uid 10001 --home-dir /app mqchat \
    && mkdir -p /var/lib/mqchat-push && chown mqchat: /var/lib/mqchat-push
USER mqchat
ENTRYPOINT ["scripts/container-entrypoint"]
CMD ["mqchat", "--help"]

FROM debian:bookworm-slim AS mosquitto-plugin
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev mosquitto-dev libmosquitto-dev \
    && rm -rf /var/lib/apt/lists/*
COPY broker/mosquitto_clientid/clientid_bind.c /src/
RUN gcc -shared -fPIC -O2 -Wall -Werror -o /src/mqchat_clientid_bind.so /src/clientid_bind.c

FROM debian:bookworm-slim AS mosquitto
RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/mosquitto /var/log/mosquitto \
    && chown mosquitto: /var/lib/mosquitto /var/log/mosquitto
COPY --from=mosquitto-plugin /src/mqchat_clientid_bind.so /usr/local/lib/mqchat/
COPY mosquitto.conf /etc/mosquitto/mosquitto.conf
EXPOSE 1883 8080
# Started as root, mosquitto drops to the mosquitto user (mosquitto.conf's default);
# the dynamic-security file that mosquitto-init wrote must be that user's.
CMD ["sh", "-c", "chown -R mosquitto: /var/lib/mosquitto && exec mosquitto -c /etc/mosquitto/mosquitto.conf"]
