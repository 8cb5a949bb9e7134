# udpmsgd in a container: a Rust builder stage and a slim Debian runtime stage.
#
#   docker build -t udpmsg .
#   docker run -d --name udpmsgd -p 7070:7070/udp \
#       -v "$PWD/server.toml:/etc/udpmsg/server.toml:ro" -v udpmsg-data:/var/lib/udpmsg udpmsg
#
# The base images are build arguments, so a machine without a registry can build from
# locally imported images (see ci/docker-test.sh). If the build context holds a `vendor/`
# directory (from `cargo vendor`), the build is offline, from those crates; otherwise cargo
# downloads the crates pinned in Cargo.lock from crates.io.
# Plain Dockerfile syntax: works with the legacy builder and with BuildKit.

ARG RUST_IMAGE=rust:1-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder
# The release profile keeps line tables (debug = 1); the image drops them (~80 MB), keeping the
# symbols, so backtraces still name functions. --build-arg CARGO_PROFILE_RELEASE_STRIP=none
# keeps everything.
ARG CARGO_PROFILE_RELEASE_STRIP=debuginfo
WORKDIR /build
COPY . .
RUN if [ -d vendor ]; then \
        set -- --offline \
            --config 'source.crates-io.replace-with="vendored-sources"' \
            --config 'source.vendored-sources.directory="vendor"'; \
    fi \
    && cargo build --release --locked "$@" --bin udpmsgd --bin udpmsg \
    && mkdir -p /out \
    && cp target/release/udpmsgd target/release/udpmsg /out/

FROM ${RUNTIME_IMAGE}
# A fixed numeric uid/gid, so that volumes and bind mounts can be prepared on the host
# (chown 10001:10001) and orchestrators can check that the container does not run as root.
# The health check's client settings: three tries, 200 + 400 + 800 ms, then "unhealthy".
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /var/lib/udpmsg \
        --shell /usr/sbin/nologin udpmsg \
    && install -d -o udpmsg -g udpmsg -m 0750 /var/lib/udpmsg \
    && install -d -m 0755 /etc/udpmsg /usr/local/share/udpmsg \
    && printf '%s\n' \
        '# udpmsg client settings for the container health check (udpmsg ping).' \
        'request_initial_timeout_ms = 200' \
        'request_min_timeout_ms = 200' \
        'request_max_timeout_ms = 800' \
        'request_max_tries = 3' \
        > /usr/local/share/udpmsg/healthcheck.toml
COPY --from=builder /out/ /usr/local/bin/
# The defaults, documented; mount your own file over it.
COPY server.toml /etc/udpmsg/server.toml

# Settings come from the command line, then UDPMSG_* variables, then the file: these keep
# the data in the volume and listen on every IPv4 address whatever the mounted file says
# (override with `docker run -e UDPMSG_LISTEN=[::]:7070 ...`). UDPMSG_CONFIG and UDPMSG_DATA_DIR
# also serve the admin commands run with `docker exec`, which do not go through the entrypoint.
ENV UDPMSG_CONFIG=/etc/udpmsg/server.toml \
    UDPMSG_DATA_DIR=/var/lib/udpmsg \
    UDPMSG_LISTEN=0.0.0.0:7070
LABEL org.opencontainers.image.title="udpmsgd" \
      org.opencontainers.image.description="udpmsg messaging daemon (UDP) and client" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

USER 10001:10001
WORKDIR /var/lib/udpmsg
VOLUME ["/var/lib/udpmsg"]
EXPOSE 7070/udp
# Prometheus metrics are off by default; to scrape them from outside the container set
# UDPMSG_METRICS_LISTEN=0.0.0.0:9187 and publish 9187/tcp (on a private address).
# udpmsgd is PID 1 (exec form, no shell in between): it handles SIGTERM and SIGINT itself
# (commits, exits 0) and SIGHUP (reloads the configuration).
STOPSIGNAL SIGTERM
# The health check pings 127.0.0.1:7070: keep that port if you change UDPMSG_LISTEN.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["udpmsg", "--config", "/usr/local/share/udpmsg/healthcheck.toml", "--server", "127.0.0.1:7070", "ping"]
ENTRYPOINT ["udpmsgd", "--config", "/etc/udpmsg/server.toml", "--data-dir", "/var/lib/udpmsg"]
CMD []
