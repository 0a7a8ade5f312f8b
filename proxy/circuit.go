package proxy

import (
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/sidecar-proxy/sidecar/breaker"
	"github.com/sidecar-proxy/sidecar/policy"
)

// circuits keeps, per circuit name, the Breaker currently serving it, so
// that the state gauge (registered once per name) follows reloads.
type circuits struct {
	mu  sync.Mutex
	set *metrics.Set
	m   map[string]*atomic.Pointer[breaker.Breaker]
}

func (cs *circuits) slot(name string) *atomic.Pointer[breaker.Breaker] {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if p, ok := cs.m[name]; ok {
		return p
	}
	p := new(atomic.Pointer[breaker.Breaker])
	cs.m[name] = p
	cs.set.GetOrCreateGauge(fmt.Sprintf(`sidecar_breaker_state{circuit=%q}`, name), func() float64 {
		if b := p.Load(); b != nil {
			return float64(b.State(time.Now()))
		}
		return 0
	})
	cs.set.GetOrCreateGauge(fmt.Sprintf(`sidecar_bulkhead_in_flight{circuit=%q}`, name), func() float64 {
		if b := p.Load(); b != nil {
			return float64(b.InFlight())
		}
		return 0
	})
	return p
}

// newBreaker builds the upstream's circuit (name "upstream:<name>").
func (p *Proxy) newBreaker(u *upstreamRuntime) (err error) {
	if u.spec.Breaker == nil {
		return nil
	}
	u.brk, err = p.circuit("upstream:"+u.spec.Name, u.spec.Breaker)
	u.rejected = p.set.GetOrCreateCounter(fmt.Sprintf(`sidecar_bulkhead_rejections_total{upstream=%q}`, u.spec.Name))
	return err
}

// circuit builds one named circuit with its metrics.
func (p *Proxy) circuit(name string, spec *policy.Breaker) (*breaker.Breaker, error) {
	toOpen := p.set.GetOrCreateCounter(fmt.Sprintf(`sidecar_breaker_transitions_total{circuit=%q,to="open"}`, name))
	toClosed := p.set.GetOrCreateCounter(fmt.Sprintf(`sidecar_breaker_transitions_total{circuit=%q,to="closed"}`, name))
	b, err := breaker.New(breaker.Settings{Name: name, ErrorPercent: spec.ErrorPercent, VolumeThreshold: spec.VolumeThreshold,
		SleepWindow: spec.SleepWindow, MaxConcurrent: spec.MaxConcurrent, ConsecutiveFailures: spec.ConsecutiveFailures}, func(to breaker.State) {
		if to == breaker.Open {
			toOpen.Inc()
			p.log.Warn("circuit opened: the upstream is cut off", "circuit", name, "sleep_window", spec.SleepWindow.String())
		} else {
			toClosed.Inc()
			p.log.Info("circuit closed: the upstream is back", "circuit", name)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("circuit %s: %w", name, err)
	}
	b.Inherit(p.circuits.slot(name).Load()) // a reload keeps an open circuit open
	p.circuits.slot(name).Store(b)
	return b, nil
}

var fallbackReasons = [...]string{"open", "saturated", "shed", "timeout", "error"}

// errFallback ends a request whose upstream failed (or whose circuit or
// bulkhead refused it) and has a fallback: answer serves it, for the
// reason in x.r.fallback.
var errFallback = errors.New("proxy: the upstream's fallback answers")

// enterCircuit takes the route's place in its circuit and bulkhead
// (admission's Circuit); when either says no, the fallback answers at once
// (no upstream contact, no queueing).
func (x *exchange) enterCircuit() error {
	t, retry, err := x.r.st.adm.Circuit(x.r.rt.route, time.Now())
	if err != nil {
		if errors.Is(err, breaker.ErrSaturated) {
			x.r.up.rejected.Inc()
		}
		x.leaveOverload(time.Now()) // refused here: the upstream was not asked
		return x.fallBack(answerFor(err).reason, retry)
	}
	x.r.ticket = t
	return nil
}

// fallBack decides what becomes of a request its upstream failed: it goes
// to the fallback upstream when one is configured and no request body has
// been sent anywhere yet (nothing is replayed half-sent), and nil says so;
// else errFallback, answered by serveFallback. A fallback upstream's own
// failure is not rerouted again.
func (x *exchange) fallBack(reason string, retry time.Duration) error {
	x.r.up.m.fallbackInc(reason)
	first := x.r.fallback == ""
	x.r.fallback, x.r.retryAfter = reason, retry
	if fb := x.r.up.spec.Fallback; fb != nil && fb.Upstream != "" && first && x.up.Replayable() {
		if alt := x.r.st.upstreams[fb.Upstream]; alt != nil {
			x.leaveOverload(time.Now()) // the slot was the failing upstream's
			x.r.ticket.Done()
			x.r.ticket = breaker.Ticket{}
			x.up.Response.Reset()
			x.r.up = alt
			// The fallback upstream's own limit, circuit and bulkhead
			// apply: a rerouted request is one of its requests (refused
			// there, the request is answered: no second reroute).
			if err := x.takeSlot(x.r.st.overload[alt.spec.Name]); err != nil {
				return err
			}
			return x.enterFallbackCircuit(alt)
		}
	}
	return errFallback
}

// enterFallbackCircuit takes the request's place in the fallback
// upstream's circuit and bulkhead, whose verdicts it then reports: while
// that circuit is open the fallback upstream is not contacted either, and
// its max_concurrent counts rerouted requests too.
func (x *exchange) enterFallbackCircuit(alt *upstreamRuntime) error {
	if alt.brk == nil {
		return nil
	}
	t, retry, err := alt.brk.Allow(time.Now())
	if err != nil {
		if errors.Is(err, breaker.ErrSaturated) {
			alt.rejected.Inc()
		}
		x.leaveOverload(time.Now()) // refused here: the upstream was not asked
		x.r.retryAfter = max(x.r.retryAfter, retry)
		return errFallback
	}
	x.r.ticket = t
	return nil
}

// serveFallback answers for a failing upstream: with the configured
// response, else with the core's status for the reason. Every such answer
// names its reason in X-Sidecar-Fallback and carries Retry-After.
func (x *exchange) serveFallback() (message string) {
	ctx := x.r.ctx
	a := fallbackAnswers[indexOr(fallbackReasons[:], x.r.fallback)]
	if fb := x.r.up.spec.Fallback; fb != nil && fb.Upstream == "" {
		ctx.Response.SetStatusCode(fb.Status)
		ctx.Response.Header.SetContentType(fb.ContentType)
		ctx.Response.Header.SetBytesV(x.idHeader(), x.reqID)
		ctx.Response.SetBodyRaw(fb.Body) // immutable config bytes
		x.r.status = fb.Status
	} else {
		writeError(ctx, a.status, a.message, x.reqID, x.idHeader())
		x.r.status = a.status
	}
	retry := x.r.retryAfter
	if retry <= 0 {
		retry = time.Second
	}
	ctx.Response.Header.Set("X-Sidecar-Fallback", x.r.fallback)
	ctx.Response.Header.Set("Retry-After", strconv.Itoa(ceilSeconds(retry)))
	return a.message
}

// fallbackAnswers: the core's answer for each fallback reason, in
// fallbackReasons' order.
var fallbackAnswers = [len(fallbackReasons)]struct {
	status  int
	message string
}{
	{fasthttp.StatusServiceUnavailable, "upstream circuit open"},
	{fasthttp.StatusServiceUnavailable, "upstream saturated"},
	{fasthttp.StatusServiceUnavailable, "upstream overloaded"},
	{fasthttp.StatusGatewayTimeout, "upstream timed out"},
	{fasthttp.StatusBadGateway, "upstream unavailable"},
}
