# make test  - everything CI runs: installs redis-server, prometheus and docker-compose if missing,
#              then format check, vet, unit and end-to-end tests with -race, deploy/ checks
# make bench - throughput and latency, direct vs through the sidecar (needs wrk; installed if missing)
# make run   - the sidecar on the embedded demo config
# make fuzz  - the fuzz targets (config loader, identity, request heads, access-log lines), FUZZTIME each
# make chaos - the chaos suite at full length (Redis frozen 10 s, 30 s of SIGHUPs, ...)
# make soak  - 2 million requests from 1 million clients per store; prints a table

GO ?= go
APT_INSTALL = DEBIAN_FRONTEND=noninteractive apt-get install -y -q

.PHONY: test bench run build deps-test deps-bench fmt-check fuzz chaos soak

build:
	$(GO) build -o bin/sidecar .

run:
	$(GO) run . -demo

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# The tests start their own redis-server processes on free loopback ports.
# The monitoring tests run a real Prometheus and promtool (Debian's prometheus).
# The identity tests run a real WSGI backend (Python's wsgiref).
deps-test:
	@command -v redis-server >/dev/null || { apt-get update -q && $(APT_INSTALL) redis-server; }
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ apt-get update -q && $(APT_INSTALL) --no-install-recommends prometheus; }
	@command -v docker-compose >/dev/null || { apt-get update -q && $(APT_INSTALL) --no-install-recommends docker-compose; }
	@# a real CGI-style backend for the identity tests: Python's wsgiref
	@command -v python3 >/dev/null || { apt-get update -q && $(APT_INSTALL) --no-install-recommends python3; }
	@# h2spec, the HTTP/2 conformance suite, into GOPATH's bin, where test/h2spec_test.go also looks
	@command -v h2spec >/dev/null || [ -x "$$($(GO) env GOPATH | cut -d: -f1)/bin/h2spec" ] || \
		GOBIN="$$($(GO) env GOPATH | cut -d: -f1)/bin" $(GO) install github.com/summerwind/h2spec/cmd/h2spec@v2.2.1+incompatible

# timed,NAME,COMMAND runs COMMAND and prints its wall time (go test also
# prints each package's).
timed = t0=$$(date +%s); $(2); rc=$$?; echo "== $(1): $$(( $$(date +%s) - t0 )) s"; exit $$rc
test: fmt-check deps-test
	@$(call timed,go vet,$(GO) vet ./...)
	@$(call timed,unit tests (-race),$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v '/test$$'))
	@# the real binary against real backends, redis-server, Redis Cluster and Sentinel; the chaos suite briefly
	@$(call timed,end-to-end and chaos tests (-race),$(GO) test -race -count=1 -timeout 20m ./test)
	@# deploy/ is its own module (the Kubernetes API types stay out of the binary)
	@$(call timed,deploy manifests and compose example,(cd deploy && $(GO) vet ./... && $(GO) test -count=1 ./...) && \
		docker-compose -f deploy/docker-compose/docker-compose.yml --profile monitoring config -q)
	@# each fuzz target for a short, bounded time (make fuzz runs them longer)
	@$(call timed,fuzz targets ($(FUZZTIME_CI) each),$(MAKE) --no-print-directory fuzz FUZZTIME=$(FUZZTIME_CI))

# A count, not a duration: go1.26's fuzz coordinator can fail a target with a bare
# "context deadline exceeded" when a duration -fuzztime ends (go.dev/issue/75804).
FUZZTIME_CI = 100000x

# The chaos suite at full length; make test runs the same tests briefly.
chaos: deps-test
	$(GO) test -count=1 -timeout 30m -run Chaos -v ./test -args -long

soak: deps-test
	$(GO) run ./bench/soak

deps-bench:
	@command -v wrk >/dev/null || { apt-get update -q && $(APT_INSTALL) wrk; }
	@command -v nginx >/dev/null || { apt-get update -q && $(APT_INSTALL) nginx-light || $(APT_INSTALL) nginx; } || true
	@command -v haproxy >/dev/null || { apt-get update -q && $(APT_INSTALL) haproxy; } || true
	@command -v taskset >/dev/null || { apt-get update -q && $(APT_INSTALL) util-linux; }
	@command -v h2load >/dev/null || { apt-get update -q && $(APT_INSTALL) nghttp2-client; } || true

bench: deps-bench
	$(GO) run ./bench

# Each fuzz target for FUZZTIME: a count of executions (default 1,000,000x; a
# duration such as 60s works too, but see FUZZTIME_CI on go1.26).
FUZZTIME ?= 1000000x
fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime $(FUZZTIME) ./policy
	$(GO) test -run '^$$' -fuzz FuzzIdentify -fuzztime $(FUZZTIME) ./policy
	$(GO) test -run '^$$' -fuzz FuzzRequestHead -fuzztime $(FUZZTIME) ./proxy
	$(GO) test -run '^$$' -fuzz FuzzAccessLogLine -fuzztime $(FUZZTIME) ./proxy
