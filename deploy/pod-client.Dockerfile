# The application container of deploy/pod-test.sh: the static example client
# walq-server/examples/pod_client.rs alone in an empty image, as the sidecar's image is.
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
#     --target x86_64-unknown-linux-gnu -p walq-server --example pod_client
#   DOCKER_BUILDKIT=1 docker build -f deploy/pod-client.Dockerfile -t walq-pod-client .
FROM scratch

COPY target/x86_64-unknown-linux-gnu/release/examples/pod_client /pod_client

# The same non-root user as walq; numeric, since there is no /etc/passwd.
USER 65532:65532
# The volume the pod's containers share (an emptyDir in Kubernetes): the client's
# journals of what was acknowledged. With BuildKit the WORKDIR belongs to 65532, so a
# fresh named volume mounted here is writable by it.
WORKDIR /shared
VOLUME ["/shared"]

ENTRYPOINT ["/pod_client"]
CMD ["pause"]
