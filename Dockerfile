# syntax=docker/dockerfile:1
# The two images the chart's defaults name:
#   docker build --target injector -t ghcr.io/ferry-mesh/ferry-injector:0.1.0 .
#   docker build --target proxy    -t ghcr.io/ferry-mesh/ferry-proxy:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# .ci/release: ferry-proxy with glibc linked in and its hot code first (see the script).
RUN bash .ci/release --locked -p ferry-injector -p ferry-init \
 && mkdir out \
 && cp target/release/ferry-injector target/release/ferry-proxy target/release/ferry-init out/ \
 && strip out/*

# The webhook: one binary on distroless (glibc only, no shell), non-root.
FROM gcr.io/distroless/cc-debian12:nonroot AS injector
COPY --from=build /src/out/ferry-injector /usr/local/bin/ferry-injector
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ferry-injector"]

# The sidecar image, used for both injected containers like Istio's proxyv2: `istio-iptables ...`
# (istio-init, as root with NET_ADMIN) hands over to ferry-init, which needs the iptables tools;
# `proxy sidecar ...` (istio-proxy, UID 1337) runs the proxy; `pilot-agent request|wait` work for
# the lifecycle hooks.
FROM debian:bookworm-slim AS proxy
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/out/ferry-proxy /src/out/ferry-init /usr/local/bin/
RUN ln -s ferry-proxy /usr/local/bin/pilot-agent && ln -s ferry-init /usr/local/bin/istio-iptables
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/ferry-proxy"]
