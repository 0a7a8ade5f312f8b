# Static, non-root image of the sidecar.
#   docker build --build-arg VERSION=1.0.0 -t sidecar .
#   docker run -e SIDECAR_UPSTREAM_URL=http://app:3000 -p 8080:8080 -p 9090:9090 sidecar
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/sidecar .

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/sidecar /sidecar
COPY sidecar.toml /etc/sidecar/sidecar.toml
# A container's loopback is unreachable from outside and kubelet probes come
# from the node: listen on all interfaces (the file says 127.0.0.1).
ENV SIDECAR_LISTEN=0.0.0.0:8080 SIDECAR_ADMIN_LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
USER nonroot
HEALTHCHECK --interval=10s --timeout=3s CMD ["/sidecar", "-healthcheck", "-config", "/etc/sidecar/sidecar.toml"]
ENTRYPOINT ["/sidecar", "-config", "/etc/sidecar/sidecar.toml"]
