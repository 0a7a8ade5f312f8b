// Package health serves the admin listener: liveness (/healthz), readiness
// (/readyz) and Prometheus metrics (/metrics). It never shares a port with
// the proxy, so probes and scrapes keep working when the proxy port is
// saturated, and the proxy never exposes them to clients.
package health

import (
	"bytes"
	"encoding/json"
	"sync/atomic"

	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/pprofhandler"
)

// State is the process's readiness. The zero value is not ready; call
// SetReady once the proxy listener accepts connections.
type State struct {
	ready    atomic.Bool
	draining atomic.Bool
	check    atomic.Pointer[func() error]
}

// SetCheck adds a readiness condition: /readyz fails while check returns
// an error (its text is the response body).
func (s *State) SetCheck(check func() error) { s.check.Store(&check) }

// SetReady marks the process ready to receive traffic.
func (s *State) SetReady() { s.ready.Store(true) }

// StartDrain makes /readyz fail from now on, so load balancers and
// Kubernetes stop sending before the listener closes.
func (s *State) StartDrain() { s.draining.Store(true) }

// notReady says why /readyz fails, or "" when ready. The check runs once:
// its verdict and its message are one answer, even if it flips meanwhile.
func (s *State) notReady() string {
	switch {
	case s.draining.Load():
		return "draining"
	case !s.ready.Load():
		return "starting"
	}
	if check := s.check.Load(); check != nil {
		if err := (*check)(); err != nil {
			return err.Error()
		}
	}
	return ""
}

// Handler returns the admin request handler. status, if not nil, is
// served as JSON at /status (read-only). With pprof, Go's profiler is
// served under /debug/pprof/ as well.
func Handler(s *State, pprof bool, status func() any) fasthttp.RequestHandler {
	return func(ctx *fasthttp.RequestCtx) {
		if pprof && bytes.HasPrefix(ctx.Path(), []byte("/debug/pprof/")) {
			pprofhandler.PprofHandler(ctx)
			return
		}
		if !ctx.IsGet() && !ctx.IsHead() {
			ctx.Error("method not allowed\n", fasthttp.StatusMethodNotAllowed)
			return
		}
		switch string(ctx.Path()) {
		case "/healthz":
			ctx.SetContentType("text/plain; charset=utf-8")
			ctx.WriteString("ok\n") //nolint:errcheck
		case "/readyz":
			ctx.SetContentType("text/plain; charset=utf-8")
			if msg := s.notReady(); msg != "" {
				ctx.SetStatusCode(fasthttp.StatusServiceUnavailable)
				ctx.WriteString(msg + "\n") //nolint:errcheck
				return
			}
			ctx.WriteString("ready\n") //nolint:errcheck
		case "/status":
			if status == nil {
				ctx.Error("not found\n", fasthttp.StatusNotFound)
				return
			}
			b, err := json.MarshalIndent(status(), "", "  ")
			if err != nil {
				ctx.Error("status unavailable\n", fasthttp.StatusInternalServerError)
				return
			}
			ctx.SetContentType("application/json")
			ctx.Write(append(b, '\n')) //nolint:errcheck
		case "/metrics":
			ctx.SetContentType("text/plain; version=0.0.4; charset=utf-8")
			WritePrometheus(ctx)
		default:
			ctx.Error("not found\n", fasthttp.StatusNotFound)
		}
	}
}
