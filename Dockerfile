# Static, non-root image of the sidecar. Build: docker build --build-arg VERSION=1.0.0 -t sidecar .
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
# The proxy and admin ports of the shipped config. In a container, set
# listen/admin_listen to 0.0.0.0 (the image's loopback is unreachable).
EXPOSE 8080 9090
USER nonroot
ENTRYPOINT ["/sidecar", "-config", "/etc/sidecar/sidecar.toml"]
