# make test  - everything CI runs: installs redis-server, prometheus and docker-compose if missing,
#              then format check, vet, unit and end-to-end tests with -race, deploy/ checks
# make bench - throughput and latency, direct vs through the sidecar (needs wrk; installed if missing)
# make run   - the sidecar on the embedded demo config
# make fuzz  - the fuzz targets (config loader, identity, request heads), FUZZTIME each

GO ?= go
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y -q

.PHONY: test bench run build deps-test deps-bench fmt-check fuzz

build:
	$(GO) build -o bin/sidecar .

run:
	$(GO) run . -demo

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# The tests start their own redis-server processes on free loopback ports.
# The monitoring tests run a real Prometheus and promtool (Debian's prometheus).
deps-test:
	@command -v redis-server >/dev/null || { apt-get update -q && $(APT_INSTALL) redis-server; }
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ apt-get update -q && $(APT_INSTALL) --no-install-recommends prometheus; }
	@command -v docker-compose >/dev/null || { apt-get update -q && $(APT_INSTALL) --no-install-recommends docker-compose; }

test: fmt-check deps-test
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m ./...
	# deploy/ is its own module (the Kubernetes API types stay out of the binary)
	cd deploy && $(GO) vet ./... && $(GO) test -count=1 ./...
	docker-compose -f deploy/docker-compose/docker-compose.yml --profile monitoring config -q
	# each fuzz target for a short, bounded time (make fuzz runs them longer)
	$(MAKE) --no-print-directory fuzz FUZZTIME=8s

deps-bench:
	@command -v wrk >/dev/null || { apt-get update -q && $(APT_INSTALL) wrk; }
	@command -v nginx >/dev/null || { apt-get update -q && $(APT_INSTALL) nginx-light || $(APT_INSTALL) nginx; } || true
	@command -v taskset >/dev/null || { apt-get update -q && $(APT_INSTALL) util-linux; }

bench: deps-bench
	$(GO) run ./bench

# Each fuzz target for a short, bounded time (FUZZTIME, default 20s).
FUZZTIME ?= 20s
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime $(FUZZTIME) ./policy
	$(GO) test -run '^$$' -fuzz FuzzIdentify -fuzztime $(FUZZTIME) ./policy
	$(GO) test -run '^$$' -fuzz FuzzRequestHead -fuzztime $(FUZZTIME) ./proxy
