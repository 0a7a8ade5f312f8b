package proxy

import (
	"strconv"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

func TestActiveClientsEstimate(t *testing.T) {
	a := newActiveClients(metrics.NewSet())
	t0 := time.Unix(1_800_000_000, 0)
	// 10,000 clients ten minutes ago, 2,000 now (500 of them seen before).
	for i := 0; i < 10_000; i++ {
		a.add("anonymous", []byte("ip:10.0."+strconv.Itoa(i)), t0)
	}
	now := t0.Add(10 * time.Minute)
	for i := 9_500; i < 11_500; i++ {
		a.add("anonymous", []byte("ip:10.0."+strconv.Itoa(i)), now)
	}
	within := func(got uint64, want float64) bool { return float64(got) > want*0.97 && float64(got) < want*1.03 }
	if got := a.estimate("anonymous", 1, now); !within(got, 2000) {
		t.Errorf("1m: %d, want ~2000", got)
	}
	if got := a.estimate("anonymous", 5, now); !within(got, 2000) {
		t.Errorf("5m: %d, want ~2000", got)
	}
	if got := a.estimate("anonymous", 15, now); !within(got, 11_500) {
		t.Errorf("15m: %d, want ~11500", got)
	}
	if got := a.estimate("premium", 15, now); got != 0 {
		t.Errorf("unknown tier: %d", got)
	}
	// An hour later nothing is active.
	if got := a.estimate("anonymous", 15, now.Add(time.Hour)); got != 0 {
		t.Errorf("an hour later: %d", got)
	}
}
