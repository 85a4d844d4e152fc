# syntax=docker/dockerfile:1
#
# catalog-cache image: the sidecar (`catalog-cache`) and the demo/chaos tool
# (`catalog-chaos`, whose `fake-catalog` docker-compose.yml uses as a
# stand-in catalog; the catalog itself is the `catalog-fake` library in
# chaos/fake, built as a dependency of both binaries).
#
#   docker build -t catalog-cache .
#   docker run --rm -e CATALOG_CACHE_UPSTREAM_URL=http://backstage:7007/api/catalog \
#     -v catalog-cache:/var/lib/catalog-cache catalog-cache
#
# Listeners: the admin listener (health, metrics, status page) binds
# 0.0.0.0:7071 so probes and Prometheus can reach it. The proxy stays on
# 127.0.0.1:7070 by default: as a sidecar it is reached over the pod's
# loopback, and it serves the sidecar's own upstream view to every caller.
# To publish it, set CATALOG_CACHE_LISTEN_PROXY=0.0.0.0:7070 (and consider
# CATALOG_CACHE_PROXY_CLIENT_TOKENS_FILE).

ARG RUST_VERSION=1.95

# --- build -------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# Dependencies first, against stub sources, so that this layer is reused
# until Cargo.toml or Cargo.lock change. Targets declared with an explicit
# `path =` get a stub too, or cargo refuses to load the manifest.
# `chaos/fake` (catalog-fake) is a library only: no stub main.rs, or cargo
# would see a binary target that the real sources do not have.
COPY Cargo.toml Cargo.lock ./
COPY chaos/Cargo.toml chaos/
COPY chaos/fake/Cargo.toml chaos/fake/
RUN set -eux; \
    for dir in . chaos chaos/fake; do \
      mkdir -p "$dir/src"; \
      if [ "$dir" != chaos/fake ]; then echo 'fn main() {}' > "$dir/src/main.rs"; fi; \
      : > "$dir/src/lib.rs"; \
      sed -n 's/^path *= *"\(.*\.rs\)".*/\1/p' "$dir/Cargo.toml" | while read -r p; do \
        mkdir -p "$dir/$(dirname "$p")"; echo 'fn main() {}' > "$dir/$p"; \
      done; \
    done; \
    cargo build --release --locked -p catalog-cache -p catalog-chaos; \
    rm -rf src chaos/src chaos/fake/src

# The real sources. COPY keeps the files' own mtimes, which can be older
# than the stubs' build: touch them so cargo rebuilds our crates.
COPY . .
RUN set -eux; \
    find src chaos/src chaos/fake/src -name '*.rs' -exec touch {} +; \
    cargo build --release --locked -p catalog-cache -p catalog-chaos --bins; \
    mkdir -p /out; \
    cp target/release/catalog-cache target/release/catalog-chaos /out/; \
    /out/catalog-cache --help >/dev/null

# --- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates: an https upstream; tini: forwards SIGTERM and reaps as PID 1.
# Unpinned on purpose: bookworm's point releases carry the security fixes.
# hadolint ignore=DL3008
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates tini; \
    rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 10001 catalog-cache; \
    useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/catalog-cache \
      --shell /usr/sbin/nologin catalog-cache; \
    install -d -o 10001 -g 10001 -m 0700 /var/lib/catalog-cache; \
    install -d -m 0755 /etc/catalog-cache

COPY --from=build /out/catalog-cache /out/catalog-chaos /usr/local/bin/
COPY config/catalog-cache.toml /etc/catalog-cache/catalog-cache.toml

# The config file documents the defaults; these point them at the container
# layout. Every key stays overridable with CATALOG_CACHE_<SECTION>_<KEY>.
# CATALOG_CACHE_CONFIG and CATALOG_CACHE_ADMIN_URL let the HEALTHCHECK's
# `catalog-cache check` and `docker exec … catalog-cache status` find the
# same config and the admin listener over loopback.
# (ADMIN_TOKEN_FILE is a path, not a secret: the token is generated at first start.)
# hadolint ignore=DL3064
ENV CATALOG_CACHE_CONFIG=/etc/catalog-cache/catalog-cache.toml \
    CATALOG_CACHE_ADMIN_URL=http://127.0.0.1:7071 \
    CATALOG_CACHE_LISTEN_ADMIN=0.0.0.0:7071 \
    CATALOG_CACHE_LISTEN_PROXY=127.0.0.1:7070 \
    CATALOG_CACHE_MIRROR_PATH=/var/lib/catalog-cache/catalog-cache.db \
    CATALOG_CACHE_ADMIN_TOKEN_FILE=/var/lib/catalog-cache/admin.token \
    CATALOG_CACHE_LOG_FORMAT=json

# Numeric so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /var/lib/catalog-cache
VOLUME ["/var/lib/catalog-cache"]
EXPOSE 7070 7071

# Ready = a mirror generation is loaded and the stale policy allows serving
# it; it does not depend on the upstream, so an outage never fails it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["catalog-cache", "check"]

ENTRYPOINT ["/usr/bin/tini", "--", "catalog-cache"]
CMD ["serve", "--config", "/etc/catalog-cache/catalog-cache.toml"]
