# syntax=docker/dockerfile:1
#
# wsgate's image, in two stages: a builder with the Rust toolchain where maturin builds the
# wheel, and a slim runtime that has only CPython and the installed wheel.
#
#   docker build -t wsgate:0.1.0 .
#   docker run --rm -p 8765:8765 --stop-timeout 40 \
#     -v "$PWD/deploy/wsgate.secrets:/run/secrets/wsgate/secrets:ro" wsgate:0.1.0
#
# The default command serves /etc/wsgate/wsgate.toml (deploy/wsgate.toml, baked in below): it
# needs the token secrets file, and uses Valkey at valkey:6379 for token sessions (see
# deploy/compose.yaml and deploy/kubernetes/). `docker run --rm -p 8765:8765 wsgate:0.1.0 serve
# --host 0.0.0.0` serves the built-in echo.demo agent alone, with nothing mounted.
# `docker stop` waits 10 s by default before SIGKILL: give it more than the config's
# drain_timeout (--stop-timeout / -t, or Compose's stop_grace_period) so sessions can drain.

# Builder: the full Debian image has the C linker and curl that rustup and rustc need, and the
# same Debian release (glibc) as the runtime below, so the wheel's extension loads there.
FROM python:3.12-bookworm AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV RUSTUP_HOME=/opt/rustup \
    CARGO_HOME=/opt/cargo \
    PATH=/opt/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain 1.95.0
RUN pip install --no-cache-dir maturin==1.16.0
WORKDIR /src
# Only what the wheel is built from (README.md is the package's long description).
COPY pyproject.toml Cargo.toml Cargo.lock README.md ./
COPY rust/ rust/
COPY python/ python/
# Cargo's downloads and build directory are cache mounts: kept between builds, not in a layer.
RUN --mount=type=cache,target=/opt/cargo/registry \
    --mount=type=cache,target=/src/target \
    maturin build --release --locked -o /wheels

# Runtime: CPython and the wheel (an abi3 wheel: one for every CPython >= 3.10).
FROM python:3.12-slim-bookworm
RUN groupadd --system --gid 10001 wsgate \
    && useradd --system --uid 10001 --gid wsgate --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin wsgate
# The wheel is bind-mounted from the builder, so it is in no layer of this image; pip fetches
# its few pure-Python dependencies (anyio) from the index.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        /wheels/wsgate-*.whl
COPY deploy/wsgate.toml /etc/wsgate/wsgate.toml
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8765
# SIGTERM starts the graceful drain (up to drain_timeout); a second one closes sessions at once.
STOPSIGNAL SIGTERM
# /livez answers 200 while the process serves; urllib raises (exit 1) on anything else.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8765/livez', timeout=2)"]
ENTRYPOINT ["wsgate"]
CMD ["serve", "--config", "/etc/wsgate/wsgate.toml"]
