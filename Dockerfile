# The `walq serve` sidecar: one static binary in an otherwise empty image (no shell,
# no libc, no package manager, nothing to patch but walq itself).
#
# The binary is built outside docker, so the image needs no base image to pull:
#   RUSTFLAGS="-C target-feature=+crt-static" \
#     cargo build --release -p walq-cli --target x86_64-unknown-linux-gnu
#   docker build -t walq:0.1.0 .
# It runs as 65532 with a read-only root; the data volume is the only thing written:
#   docker run --read-only -v walq-data:/var/lib/walq -p 9600:9600 walq:0.1.0
# The data plane listens on the container's loopback only (it is meant for the other
# containers of the same pod); deploy/kubernetes/README.md explains each choice.
FROM scratch

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="walq" \
      org.opencontainers.image.description="walq serve: a durable local message queue as an HTTP sidecar" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

# Owned by root and not writable by 65532: the process cannot replace its own binary.
COPY target/x86_64-unknown-linux-gnu/release/walq /walq

# Numeric, since a scratch image has no /etc/passwd to look a name up in.
USER 65532:65532
# BuildKit creates a WORKDIR owned by the current USER, so a fresh named volume mounted
# here (docker copies the image's ownership into it) is writable by 65532. (The legacy
# builder makes it root's: build with BuildKit, or mount a volume 65532 can write.)
WORKDIR /var/lib/walq
VOLUME ["/var/lib/walq"]

# 3600: the data plane (bound to 127.0.0.1 below); 9600: probes and /metrics.
EXPOSE 3600 9600
# SIGTERM drains: /readyz turns 503, requests in flight finish, all is synced, exit 0.
STOPSIGNAL SIGTERM

ENTRYPOINT ["/walq"]
# Addresses are numeric on purpose: a static glibc binary in an image without NSS
# configuration cannot resolve names such as `localhost`.
CMD ["serve", "--data-dir", "/var/lib/walq", "--listen", "127.0.0.1:3600", "--admin-listen", "0.0.0.0:9600"]
