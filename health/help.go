package health

// help is the HELP text of every sidecar_* family, and of the runtime
// histograms this package rewrites. VictoriaMetrics/metrics has no way to
// attach HELP to a series (with ExposeMetadata it writes "# HELP name" with
// no text), so WritePrometheus fills it in from here at exposition time:
// the families are registered in proxy/, limiter/, main.go and here, and
// one table keeps their documentation in one place.
//
// A family registered anywhere in the module must have an entry;
// TestEveryFamilyHasHelp reads the sources to check. Label values named
// here are closed sets defined where the series is registered; the README
// ("Reading /metrics") says more.
var help = map[string]string{
	// Requests (proxy/metrics.go).
	"sidecar_requests_total":                 "Requests answered, by route, method, status class and tier (none: answered before identification; other: a tier not in the config).",
	"sidecar_request_duration_seconds":       "Time from a request's arrival to the end of its response, by route.",
	"sidecar_added_latency_seconds":          "The sidecar's own share of a request's time (total minus time on the upstream), by route.",
	"sidecar_request_body_bytes_total":       "Request body bytes written to the upstream, by route.",
	"sidecar_response_body_bytes_total":      "Response body bytes sent to clients, by route.",
	"sidecar_requests_in_flight":             "Requests being served now.",
	"sidecar_requests_by_protocol_total":     "Requests by the protocol the client spoke (http1: HTTP/1.x on fasthttp; h2: HTTP/2, by ALPN or h2c).",
	"sidecar_requests_rejected_total":        "Requests refused before routing, by reason (malformed: an unparsable or invalid request head).",
	"sidecar_panics_recovered_total":         "Panics recovered in the request path; the request got a 500 and the process kept serving.",
	"sidecar_identity_problems_total":        "Client identification problems by reason: unknown_key, bad_token, ambiguous (refused), unknown_tier (the authenticated tier was used instead), failure_limit (the address was refused with 429).",
	"sidecar_active_clients":                 "Distinct clients seen per tier over the last window (1m, 5m, 15m): a HyperLogLog estimate, about 1% error.",
	"sidecar_access_log_dropped_total":       "Access log lines dropped because the log writer fell behind.",
	"sidecar_open_connections":               "Client connections open on the proxy listener now (HTTP/1.1 and HTTP/2).",
	"sidecar_connections_refused_total":      "HTTP/2 client connections closed at once because server.max_connections were open.",
	"sidecar_http2_rapid_reset_closes_total": "HTTP/2 client connections closed because their client reset most of their streams at once (rapid reset).",
	"sidecar_upstream_duration_seconds":      "Time spent on the upstream, from the first attempt to the end of its response, by upstream.",
	"sidecar_upstream_errors_total":          "Failed upstream attempts, by upstream and kind (refused, connect_timeout, pool_exhausted, timeout, reset, protocol, tls, other).",
	"sidecar_upstream_dials_total":           "New connections opened to the upstream; compare with requests to see pooling work.",
	"sidecar_upstream_retries_total":         "Requests retried on another endpoint of the upstream.",
	"sidecar_upstream_healthy_endpoints":     "Endpoints of the upstream usable now.",
	"sidecar_health_checks_total":            "Active health check probes, by upstream and result (pass, fail).",

	// Circuit breakers and bulkheads (proxy/circuit.go).
	"sidecar_breaker_state":             "Circuit breaker state: 0 closed, 1 open, 2 half-open (the next request probes).",
	"sidecar_breaker_transitions_total": "Circuit breaker transitions, by circuit and the state entered (open, closed).",
	"sidecar_fallbacks_total":           "Fallback responses served instead of the upstream's, by upstream and reason (open, saturated, shed, timeout, error).",
	"sidecar_bulkhead_in_flight":        "Bulkhead slots taken now, by circuit.",
	"sidecar_bulkhead_rejections_total": "Requests refused because the upstream's bulkhead was full.",

	// Overload protection (proxy/overload.go, overload/).
	"sidecar_overload_limit":              "The upstream's adaptive concurrency limit now (0: overload protection was turned off for it).",
	"sidecar_overload_in_flight":          "Requests holding a slot of the upstream's concurrency limit now.",
	"sidecar_overload_queued":             "Requests waiting for a slot of the upstream's concurrency limit now.",
	"sidecar_overload_shed_total":         "Requests shed by overload protection (503, X-Sidecar-Fallback: shed) without reaching the upstream, by upstream and tier (none: the request had no tier).",
	"sidecar_overload_queue_wait_seconds": "Time requests that waited for a slot of the upstream's concurrency limit spent waiting, whether then admitted or shed, by upstream.",

	// Rate limiting (proxy/ratelimit.go, limiter/).
	"sidecar_ratelimit_decisions_total":        "Rate limit decisions, by route, tier, result (allowed, denied, shadow_denied) and source (memory, store, deny_cache, store_error_fallback, lease).",
	"sidecar_ratelimit_store_duration_seconds": "Latency of round trips to the rate limit store (Redis); a pipelined batch is one round trip.",
	"sidecar_ratelimit_store_errors_total":     "Failed round trips to the rate limit store (Redis).",
	"sidecar_ratelimit_store_commands_total":   "Round trips to the rate limit store (Redis); a pipelined batch counts once.",
	"sidecar_ratelimit_store_switches_total":   "Switches of rate limit decisions to the fallback and back to the store, by direction.",
	"sidecar_ratelimit_store_cooldown":         "1 while the rate limit store (Redis) is left alone after failures and decisions use the fallback, else 0.",
	"sidecar_ratelimit_deny_cache_hits_total":  "Requests denied from the local cache of denied clients, without a store round trip.",
	"sidecar_ratelimit_memory_keys":            "Clients whose rate limit state is held in memory.",
	"sidecar_ratelimit_memory_evictions_total": "Live rate limit states dropped from memory because the key cap was reached.",
	"sidecar_ratelimit_live_replicas":          "Sidecar replicas seen alive in the rate limit store, this one included.",
	"sidecar_ratelimit_leases_total":           "Quota leases this replica took from the rate limit store.",
	"sidecar_ratelimit_lease_units_total":      "Quota lease units, by outcome: granted, returned to the store unspent, expired (neither spent nor returned).",
	"sidecar_ratelimit_lease_keys":             "Clients holding a quota lease on this replica.",

	// Process, config and runtime (main.go, health/lag.go).
	"sidecar_build_info":                                   "Always 1; the labels name the sidecar version and the Go version that built it.",
	"sidecar_config_reloads_total":                         "Config reloads, by result; a failed reload keeps the previous config serving.",
	"sidecar_config_last_reload_success_timestamp_seconds": "Unix time of the last successful config load (at start or by a reload).",
	"sidecar_runtime_lag_seconds":                          "How late the lag probe's ticker fired last: a runtime starved of CPU shows here.",
	"sidecar_runtime_lag_probe_seconds":                    "How late the lag probe's ticker fires, every 100 ms: a runtime starved of CPU shows here.",

	// Go runtime histograms rewritten by WritePrometheus (exposition.go).
	"go_sched_latencies_seconds": "Time goroutines spent runnable before they ran (runtime/metrics /sched/latencies:seconds). _sum is estimated from the runtime's buckets.",
	"go_gc_pauses_seconds":       "Stop-the-world GC pause durations (runtime/metrics /gc/pauses:seconds). _sum is estimated from the runtime's buckets.",
}
