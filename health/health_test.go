package health

import (
	"errors"
	"runtime"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"
)

func TestLagProbeSeesABlockedRuntime(t *testing.T) {
	unit := metrics.NewSet()
	q := StartLagProbe(unit, time.Hour)
	q.observe(time.Unix(100, 0), time.Unix(100, 250_000_000))
	q.Stop()
	if got := unit.GetOrCreateGauge(`sidecar_runtime_lag_seconds`, nil).Get(); got != 0.25 {
		t.Errorf("lag gauge %v, want 0.25", got)
	}
	set := metrics.NewSet()
	p := StartLagProbe(set, 5*time.Millisecond)
	defer p.Stop()
	// A real starvation: one P, and goroutines that keep it busy.
	prev := runtime.GOMAXPROCS(1)
	defer runtime.GOMAXPROCS(prev)
	stop := make(chan struct{})
	for i := 0; i < 4; i++ {
		go func() {
			for {
				select {
				case <-stop:
					return
				default:
					for j := 0; j < 1e6; j++ {
						_ = j * j
					}
				}
			}
		}()
	}
	deadline := time.Now().Add(3 * time.Second)
	seen := 0.0
	for time.Now().Before(deadline) && seen < 0.002 {
		time.Sleep(20 * time.Millisecond)
		seen = max(seen, set.GetOrCreateGauge(`sidecar_runtime_lag_seconds`, nil).Get())
	}
	close(stop)
	if seen < 0.002 {
		t.Errorf("lag probe saw at most %v s with the only P kept busy", seen)
	}
	t.Logf("lag seen with 4 busy goroutines on one P: %.1f ms", seen*1000)
}

func TestReadiness(t *testing.T) {
	var s State
	h := Handler(&s, false, nil)
	status := func() int {
		var ctx fasthttp.RequestCtx
		ctx.Request.SetRequestURI("/readyz")
		h(&ctx)
		return ctx.Response.StatusCode()
	}
	if status() != 503 {
		t.Error("ready before SetReady")
	}
	s.SetReady()
	if status() != 200 {
		t.Error("not ready after SetReady")
	}
	failing := errors.New("no usable endpoint for upstream app")
	var err error
	s.SetCheck(func() error { return err })
	err = failing
	if status() != 503 {
		t.Error("ready while a readiness check fails")
	}
	// A check that flips between two calls: /readyz asks it once, and
	// answers with what it said (asked twice, the second answer's nil
	// error would have been dereferenced).
	calls := 0
	s.SetCheck(func() error {
		calls++
		if calls%2 == 1 {
			return failing
		}
		return nil
	})
	if status() != 503 || calls != 1 {
		t.Errorf("a flipping check: %d calls per /readyz, want 1", calls)
	}
	s.SetCheck(func() error { return err })
	err = nil
	if status() != 200 {
		t.Error("not ready after the check passes")
	}
	s.StartDrain()
	if status() != 503 {
		t.Error("ready while draining")
	}
}
